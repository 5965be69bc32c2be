"""The causal-LM task: tokenization, per-example loss, DP-SGD clipping and evaluation on a tiny Llama.

The mechanism tests compare privet's three clipping modes with a hand computation: each example's
gradient by autograd, one example at a time and unpadded, clipped to the norm, summed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privet.client import DPSettings, train
from privet.common.config import AdapterConfig, ModelConfig, PrivetConfig, TrainConfig
from privet.common.data import Examples, GenerationExamples, Turn
from privet.common.data.text import IGNORE_INDEX
from privet.common.errors import DataError, ModelError
from privet.common.modeling import BuiltModel, check_model_loads
from privet.common.tasks import CausalLM, Classification, task_for

from .llm_fixtures import (
    plain_examples,
    released_clipped_sum,
    sentiment_examples,
    tiny_llama_dir,
)

CPU = torch.device("cpu")
TASK = CausalLM()


def _built(**adapter: object) -> BuiltModel:
    cfg = ModelConfig(name=tiny_llama_dir(), task="causal_lm", max_length=48)
    return TASK.build_model(cfg, AdapterConfig(**{"top_layers": None, **adapter}), seed=0)


def _trainable(built: BuiltModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in built.model.named_parameters() if p.requires_grad}


# --- tokenization -------------------------------------------------------------------------------


def test_chat_rows_take_loss_on_the_target_and_eos_only() -> None:
    built = _built()
    tok = built.tokenizer
    ex = GenerationExamples(
        targets=["positive"], prompts=[(Turn("user", "a lovely film"),)], answer_choices=None
    )
    data = TASK.tokenize(ex, tok, max_length=48)
    ids, labels = data[0]
    target = tok("positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = tok(
        "<|im_start|>user\na lovely film<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )["input_ids"]
    assert ids == prompt + target
    assert labels == [IGNORE_INDEX] * len(prompt) + target
    assert data.lengths.tolist() == [len(ids)]
    # only the logits the loss needs: from the last prompt token on
    batch = TASK.collate([data[0]], int(tok.pad_token_id))
    assert batch["logits_to_keep"].tolist() == list(range(len(prompt) - 1, len(ids)))


def test_truncation_keeps_the_target_and_the_end_of_the_prompt() -> None:
    tok = _built().tokenizer
    long_prompt = (Turn("user", "a lovely film " * 20),)
    ex = GenerationExamples(targets=["negative"], prompts=[long_prompt])
    ids, labels = TASK.tokenize(ex, tok, max_length=12)[0]
    target = tok("negative", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == 12
    assert ids[-len(target) :] == target and labels[-len(target) :] == target
    assert labels[: 12 - len(target)] == [IGNORE_INDEX] * (12 - len(target))
    # the prompt's end (the assistant's generation prompt) is what survives
    gen = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[-len(target) - len(gen) : -len(target)] == gen


def test_plain_text_takes_loss_on_every_token() -> None:
    tok = _built().tokenizer
    data = TASK.tokenize(plain_examples(3), tok, max_length=10)
    for i in range(3):
        ids, labels = data[i]
        assert ids == labels and ids[-1] == tok.eos_token_id and len(ids) <= 10


def test_tasks_refuse_the_other_tasks_data() -> None:
    tok = _built().tokenizer
    labelled = Examples(texts=["good", "bad"], labels=np.array([1, 0]))
    with pytest.raises(DataError, match="model.task = 'causal_lm' needs generation examples"):
        TASK.tokenize(labelled, tok, max_length=16)
    with pytest.raises(DataError, match="model.task = 'classification' needs labelled texts"):
        Classification().tokenize(sentiment_examples(2), tok, max_length=16)


def test_chat_prompts_need_a_chat_template() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir(chat_template=False))
    with pytest.raises(ModelError, match="no chat template") as exc:
        TASK.tokenize(sentiment_examples(2), tok, max_length=32)
    assert "Fix:" in str(exc.value)
    TASK.tokenize(plain_examples(2), tok, max_length=32)  # plain text needs none


def test_an_encoder_cannot_be_a_causal_lm_and_says_what_it_can_do() -> None:
    with pytest.raises(ModelError, match="not a causal language model.*'classification'"):
        check_model_loads(ModelConfig(task="causal_lm"))  # the embedded MiniLM (BertModel)


def test_config_refuses_causal_lm_on_classification_data_and_full_fine_tuning() -> None:
    with pytest.raises(ValueError, match="model.task = 'causal_lm' needs a generation data source"):
        PrivetConfig.model_validate({"model": {"task": "causal_lm"}})
    files = {"source": "files", "train_files": ["x.jsonl"]}
    with pytest.raises(ValueError, match="adapter.method = 'lora'"):
        PrivetConfig.model_validate(
            {"model": {"task": "causal_lm"}, "data": files, "adapter": {"method": "full"}}
        )
    with pytest.raises(ValueError, match="faults.attack = 'label_flip'"):
        PrivetConfig.model_validate(
            {
                "model": {"task": "causal_lm"},
                "data": files,
                "faults": {"byzantine_fraction": 0.25, "attack": "label_flip"},
            }
        )
    assert task_for(PrivetConfig().model).name == "classification"


# --- the model ----------------------------------------------------------------------------------


def test_only_lora_layers_train_embeddings_lm_head_and_norms_are_frozen() -> None:
    built = _built(freeze_a=False)
    trainable = _trainable(built)
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # Llama's default targets
    inner = built.model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # tied, and frozen
    assert not inner.lm_head.weight.requires_grad


# --- DP-SGD: per-example clipping ---------------------------------------------------------------


def _examples() -> GenerationExamples:
    # chats of different lengths (padding inside every micro-batch) and two plain texts
    chat = sentiment_examples(5)
    plain = plain_examples(2)
    return GenerationExamples(
        targets=chat.targets + plain.targets, prompts=chat.prompts + plain.prompts
    )


def _per_example_grads(built: BuiltModel, data: object) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient, alone and unpadded, by autograd."""
    params = _trainable(built)
    out = []
    for i in range(len(data)):  # type: ignore[arg-type]
        batch = TASK.collate([data[i]], int(built.tokenizer.pad_token_id))  # type: ignore[index]
        loss = TASK.per_example_loss(built.model, batch, device=CPU, mixed_precision="off")
        grads = torch.autograd.grad(loss[0], list(params.values()))
        out.append(dict(zip(params, grads, strict=True)))
    return out


def _norm(g: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))


def _nudge_b(built: BuiltModel) -> None:
    # LoRA's B starts at zero, which leaves A without gradient: move B so that both have one.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bookkeeping"])
def test_clipping_releases_the_hand_computed_clipped_sum(clipping: str) -> None:
    built = _built(freeze_a=False)
    _nudge_b(built)
    data = TASK.tokenize(_examples(), built.tokenizer, max_length=48)
    grads = _per_example_grads(built, data)
    norms = [_norm(g) for g in grads]
    clip = float(np.median(norms))  # about half the examples are clipped
    expected = {n: torch.zeros_like(t) for n, t in grads[0].items()}
    for g, norm in zip(grads, norms, strict=True):
        for n, t in g.items():
            expected[n] += t * min(1.0, clip / (norm + 1e-6))
    start = {n: p.detach().clone() for n, p in _trainable(built).items()}
    out = released_clipped_sum(built, data, TASK, clip=clip, clipping=clipping)
    assert out.steps == 1 and out.examples_seen == len(data)
    for n, before in start.items():
        # SGD, lr 1, mean over the expected batch size (all examples)
        update = (before - out.state[n]) * len(data)
        torch.testing.assert_close(update, expected[n], rtol=1e-4, atol=1e-6)
    assert any(float(expected[n].abs().sum()) > 0 for n in expected if "lora_A" in n)
    assert not any(hasattr(p, "grad_sample") for p in built.model.parameters())


def test_lora_b_changes_under_dp() -> None:
    """opacus #820: under DP the LoRA B matrices (zero at the start) must move."""
    built = _built()  # FFA-LoRA, the default: only B trains
    data = TASK.tokenize(sentiment_examples(16), built.tokenizer, max_length=48)
    keys = [n for n in _trainable(built) if "lora_B" in n]
    assert keys and all(float(built.model.get_parameter(n).detach().abs().sum()) == 0 for n in keys)
    cfg = TrainConfig(lr=0.01, batch_size=8, local_epochs=1.0)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
    out = train(built.model, data, cfg, dp=dp, pad_token_id=0, task=TASK)
    for n in keys:
        assert float(out.state[n].abs().min()) > 0, n


def test_padding_and_the_prompt_contribute_no_gradient() -> None:
    built = _built(freeze_a=False)
    _nudge_b(built)
    pad = int(built.tokenizer.pad_token_id)
    data = TASK.tokenize(sentiment_examples(3), built.tokenizer, max_length=48)
    params = list(_trainable(built).values())

    def grad(batch: dict[str, torch.Tensor], row: int = 0) -> list[torch.Tensor]:
        loss = TASK.per_example_loss(built.model, batch, device=CPU, mixed_precision="off")
        return list(torch.autograd.grad(loss[row], params))

    alone = grad(TASK.collate([data[0]], pad))
    # Padded to a longer row's width, and with a different padding token: the same gradient.
    ids, labels = data[0]
    longer = (ids + [5] * 9, [IGNORE_INDEX] * (len(ids) + 9))
    for pad_id in (pad, 7):
        padded = grad(TASK.collate([data[0], longer], pad_id))
        for a, b in zip(alone, padded, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # A prompt token's label changed from "ignored" to a real token would change the gradient;
    # the loss is the mean cross-entropy over the target tokens only, computed by hand here.
    batch = TASK.collate([data[0]], pad)
    logits = built.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits.float()
    lp = torch.log_softmax(logits[0, :-1], dim=-1)
    target = [t for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    hand = -torch.stack([lp[t - 1, labels[t]] for t in target]).mean()
    torch.testing.assert_close(
        TASK.per_example_loss(built.model, batch, device=CPU, mixed_precision="off")[0], hand
    )
    unmasked = (ids, [ids[1] if t == 1 else lab for t, lab in enumerate(labels)])
    changed = grad(TASK.collate([unmasked], pad))
    assert any(not torch.allclose(a, b) for a, b in zip(alone, changed, strict=True))


# --- evaluation ---------------------------------------------------------------------------------


def test_evaluation_reports_perplexity_token_accuracy_and_exact_match() -> None:
    built = _built(freeze_a=False)
    _nudge_b(built)
    data = TASK.tokenize(sentiment_examples(6), built.tokenizer, max_length=48)
    pad = int(built.tokenizer.pad_token_id)
    res = TASK.evaluate(built.model, data, batch_size=4, pad_token_id=pad)
    # by hand: every example alone
    ce, count, hits, picks = 0.0, 0, 0, []
    with torch.no_grad():
        for i in range(len(data)):
            _, labels = data[i]
            batch = TASK.collate([data[i]], pad)
            logits = built.model(input_ids=batch["input_ids"]).logits[0, :-1]
            lp = torch.log_softmax(logits.float(), dim=-1)
            for t, lab in enumerate(labels):
                if lab != IGNORE_INDEX:
                    ce -= float(lp[t - 1, lab])
                    count += 1
                    hits += int(int(lp[t - 1].argmax()) == lab)
            scores = []
            for rows in data.choices:
                ids, lab2 = rows[i]
                out = built.model(input_ids=torch.tensor([ids])).logits[0, :-1]
                lp2 = torch.log_softmax(out.float(), dim=-1)
                scores.append(sum(float(lp2[t - 1, b]) for t, b in enumerate(lab2) if b >= 0))
            picks.append(int(np.argmax(scores)))
    assert res.num_examples == 6
    assert res.loss == pytest.approx(ce / count, rel=1e-5)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(ce / count), rel=1e-5)
    assert res.metrics["token-accuracy"] == pytest.approx(hits / count)
    truth = [1 - i % 2 for i in range(6)]  # choices are ("negative", "positive")
    assert data.answers.tolist() == truth
    exact = float(np.mean(np.array(picks) == np.array(truth)))
    assert (
        res.metrics["exact-match"] == pytest.approx(exact)
        and res.accuracy == res.metrics["exact-match"]
    )


def test_exact_match_puts_each_prompt_through_the_model_once() -> None:
    # The loss pass forwards each row once; every other choice continues from that pass's
    # key/value cache, so only the prompt's last token and the choice's tokens go through again.
    built = _built()
    data = TASK.tokenize(sentiment_examples(6), built.tokenizer, max_length=48)
    calls: list[tuple[int, int, bool]] = []

    def record(_m: object, _args: object, kwargs: dict[str, object]) -> None:
        ids = kwargs["input_ids"]
        assert isinstance(ids, torch.Tensor)
        cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        calls.append((int(ids.shape[0]), int(ids.shape[1]), cached))

    hook = built.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        TASK.evaluate(built.model, data, batch_size=4, pad_token_id=0)
    finally:
        hook.remove()
    full = [(rows, width) for rows, width, cached in calls if not cached]
    tails = [(rows, width) for rows, width, cached in calls if cached]
    answer = max(
        sum(y != IGNORE_INDEX for y in lab) for rows in data.choices for lab in rows.labels
    )
    assert sum(rows for rows, _ in full) == len(data)  # each prompt once
    assert sum(rows for rows, _ in tails) == len(data)  # the one other answer of each chat
    assert all(width == answer + 1 for _, width in tails)  # last prompt token + answer + EOS


def _reference_choice_losses(model: torch.nn.Module, data: object) -> np.ndarray:
    """Each choice row alone and unpadded, through the whole model: minus its log-likelihood."""
    out = np.zeros((len(data.choices), len(data)))  # type: ignore[attr-defined]
    with torch.no_grad():
        for c, rows in enumerate(data.choices):  # type: ignore[attr-defined]
            for i in range(len(rows)):
                ids, labels = rows[i]
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                lp = torch.log_softmax(logits.float(), dim=-1)
                out[c, i] = -sum(
                    float(lp[t - 1, y]) for t, y in enumerate(labels) if t >= 1 and y != -100
                )
    return out


def test_cached_choice_scores_are_full_passes_on_the_real_model(
    smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ModelConfig(name=str(smollm2_dir), task="causal_lm", num_hidden_layers=2, max_length=40)
    built = TASK.build_model(cfg, AdapterConfig(r=4, top_layers=None), seed=0)
    model, tok = built.model.eval(), built.tokenizer
    _nudge_b(built)  # not the base model alone: the adapter takes part in the cache too
    choices = ("positive", "negative", "positive but with doubts", "it is hard to say, honestly")
    reviews = [
        "A wonderful film.",
        "Dull.",
        "The staff were kind, but the room was cold, the breakfast came late, the lift broke "
        "twice, nobody answered the phone at night and the bill was wrong.",  # cut to fit
        "I loved every minute of it and would gladly see it again with friends.",
        "Broke after two days.",
        "Fine, I guess.",
        "Not what I hoped for at all.",
    ]
    targets = ["positive", "negative", "negative", choices[2], "negative", "meh", choices[3]]
    prompts: list[tuple[Turn, ...] | None] = [
        (Turn("system", "Say how the review feels."), Turn("user", r)) for r in reviews
    ]
    examples = GenerationExamples(targets=targets, prompts=prompts, answer_choices=choices)
    data = TASK.tokenize(examples, tok, max_length=40)
    # The premises: several-token choices, two choices sharing their first token, a chat whose
    # prompt is cut (so choices of other lengths keep other parts of it), a target no choice is.
    first = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert len(first[2]) > 2 and len(first[3]) > 2 and first[0][0] == first[2][0]
    cut = [rows.input_ids[2] for rows in data.choices]
    assert all(len(ids) == 40 for ids in cut) and cut[1][:4] == data.input_ids[2][:4] != cut[3][:4]
    assert data.answers.tolist() == [0, 1, 1, 2, 1, -1, 3]
    pad = int(tok.pad_token_id)
    reference = _reference_choice_losses(model, data)
    for batch_size in (1, 3, 8):  # alone, mixed lengths with padding, all at once
        got = TASK.choice_losses(model, data, batch_size=batch_size, pad_token_id=pad)
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-3)
        assert got.argmin(axis=0).tolist() == reference.argmin(axis=0).tolist()
    res = TASK.evaluate(model, data, batch_size=3, pad_token_id=pad)
    picks = reference.argmin(axis=0)
    assert res.metrics["exact-match"] == pytest.approx(float(np.mean(picks == data.answers)))
    # A model whose cache cannot be cut per row scores whole rows: the same numbers.
    monkeypatch.setattr("privet.common.tasks._layer_cache", lambda cache: None)
    got = TASK.choice_losses(model, data, batch_size=3, pad_token_id=pad)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-3)


# --- the real tokenizer and weights -------------------------------------------------------------


def test_smollm2_cut_trains_under_dp_with_its_chat_template(smollm2_dir: Path) -> None:
    cfg = ModelConfig(name=str(smollm2_dir), task="causal_lm", num_hidden_layers=1, max_length=48)
    built = TASK.build_model(cfg, AdapterConfig(r=4), seed=0)
    tok = built.tokenizer
    data = TASK.tokenize(sentiment_examples(8), tok, max_length=48)
    ids, labels = data[0]
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\npositive<|im_end|>"), text
    assert labels[-2:] == ids[-2:] and labels[-3] == IGNORE_INDEX
    inner = built.model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # tied in SmolLM2
    keys = [n for n in _trainable(built) if "lora_B" in n]
    dp = DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1, clipping="bookkeeping"
    )
    out = train(
        built.model,
        data,
        TrainConfig(batch_size=4),
        dp=dp,
        pad_token_id=int(tok.pad_token_id),
        task=TASK,
    )
    assert keys and all(float(out.state[n].abs().min()) > 0 for n in keys)
