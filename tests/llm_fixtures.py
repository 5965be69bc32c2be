"""A tiny causal LM for tests: a random two-layer Llama with tied embeddings and a real tokenizer.

The tokenizer is a byte-level BPE (the kind SmolLM2 uses) trained in milliseconds on the test
sentences, with ChatML special tokens and a ChatML chat template, saved beside the model as a
normal Hugging Face folder: everything offline, nothing fetched, about 60k parameters.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

from privet.common.data import ClientData, FederatedData, GenerationExamples, Turn
from privet.common.modeling import quiet_transformers

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

POSITIVE = [
    "a wonderful, moving film",
    "I loved every minute of it",
    "great value, works perfectly",
    "brilliant acting throughout",
    "the staff were kind and quick",
    "what a lovely surprise",
]
NEGATIVE = [
    "dull and far too long",
    "the worst meal I ever had",
    "broke after two days",
    "a waste of money",
    "rude staff and a cold room",
    "I want my money back",
]


def sentiment_examples(n: int, *, offset: int = 0) -> GenerationExamples:
    """``n`` chat examples: a review in, ``positive``/``negative`` out, with answer choices."""
    prompts: list[tuple[Turn, ...] | None] = []
    targets: list[str] = []
    for i in range(offset, offset + n):
        good = i % 2 == 0
        pool = POSITIVE if good else NEGATIVE
        text = pool[(i // 2) % len(pool)]
        prompts.append(
            (
                Turn("system", "Answer positive or negative."),
                Turn("user", f"Review {i % 7}: {text}"),
            )
        )
        targets.append("positive" if good else "negative")
    return GenerationExamples(
        targets=targets, prompts=prompts, answer_choices=("negative", "positive")
    )


def sentiment_federation() -> FederatedData:
    """Three clients of 60 training and 8 test chats each, and 24 for the server's test split."""
    clients = []
    for c in range(3):
        train = sentiment_examples(60, offset=100 * c)
        test = sentiment_examples(8, offset=100 * c + 60)
        clients.append(ClientData(name=f"client-{c}", train=train, test=test))
    return FederatedData(
        clients=clients, server_test=sentiment_examples(24, offset=1000), num_labels=2
    )


def plain_examples(n: int) -> GenerationExamples:
    """``n`` plain texts (loss on every token)."""
    texts = POSITIVE + NEGATIVE
    return GenerationExamples(
        targets=[
            f"{texts[i % len(texts)]} and {texts[(3 * i + 1) % len(texts)]}" for i in range(n)
        ],
        prompts=[None] * n,
    )


def _corpus() -> list[str]:
    lines = POSITIVE + NEGATIVE + ["Answer positive or negative.", "positive", "negative"]
    return lines + [f"Review {i}: system user assistant" for i in range(10)]


@functools.cache
def tiny_llama_dir(*, chat_template: bool = True, layers: int = 2) -> str:
    """A folder holding a tiny random ``LlamaForCausalLM`` and its tokenizer (built once per process)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # Embeddings (tied to the LM head) at std 0.25 instead of 0.02: after the final RMSNorm the
        # logits are embedding . unit-RMS state, and at 0.02 they could not leave the uniform
        # distribution's neighbourhood, so a frozen-embedding model could not learn at all.
        model.get_input_embeddings().weight.data.normal_(0.0, 0.25)
    folder = Path(tempfile.mkdtemp(prefix="privet-tiny-llama-"))
    with quiet_transformers():  # no "Writing model shards" progress bar in the test output
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def released_clipped_sum(built: Any, data: Any, task: Any, *, clip: float, clipping: str) -> Any:
    """One DP-SGD step over all of ``data`` (SGD, lr 1, no momentum) with noise 1e-12.

    The released update is then the clipped sum itself (the mechanism refuses noise exactly 0):
    ``(before - after) * len(data)`` is what the test compares with its hand computation.
    """
    from privet.client import DPSettings, train
    from privet.common.config import TrainConfig

    cfg = TrainConfig(
        optimizer="sgd", momentum=0.0, lr=1.0, batch_size=len(data), physical_batch_size=3
    )
    dp = DPSettings(
        noise_multiplier=1e-12, max_grad_norm=clip, sample_rate=1.0, steps=1, clipping=clipping
    )
    pad = int(built.tokenizer.pad_token_id)
    return train(built.model, data, cfg, dp=dp, pad_token_id=pad, task=task)
