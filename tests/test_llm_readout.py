"""The answer readout (``adapter.readout_tokens``): a linear probe of a causal LM in its own head.

On the tiny random Llama of ``llm_fixtures``: what trains, that only the named tokens' logits move
and by exactly ``a_j . h``, the three clipping modes against a hand computation, a DP federation
that learns the decision, the exports, and the refusals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privet.client import DPSettings, train
from privet.common.config import AdapterConfig, ModelConfig, TrainConfig, load_config
from privet.common.errors import ConfigError, ModelError
from privet.common.modeling import BuiltModel
from privet.common.tasks import CausalLM

from .inprocess_runs import simulate_causal_lm
from .llm_fixtures import (
    plain_examples,
    released_clipped_sum,
    sentiment_examples,
    tiny_llama_dir,
)

CPU = torch.device("cpu")
TASK = CausalLM()
ANSWERS = ["negative", "positive"]
HEAD_A = "base_model.model.lm_head.lora_A.default.weight"


def _built(**adapter: object) -> BuiltModel:
    cfg = ModelConfig(name=tiny_llama_dir(), task="causal_lm", max_length=48)
    settings = {"top_layers": 0, "readout_tokens": ANSWERS, **adapter}
    return TASK.build_model(cfg, AdapterConfig(**settings), seed=0)


def _ids(built: BuiltModel) -> list[int]:
    return [built.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ANSWERS]


def _trainable(built: BuiltModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in built.model.named_parameters() if p.requires_grad}


def test_only_the_readout_trains_and_round_0_is_the_base_model() -> None:
    built = _built()
    assert list(_trainable(built)) == [HEAD_A]
    a = built.model.get_parameter(HEAD_A)
    assert (
        tuple(a.shape) == (2, 32) and float(a.detach().abs().sum()) == 0.0
    )  # 32: the tiny model's width
    b = built.model.get_base_model().lm_head.lora_B["default"].weight
    expected = torch.zeros_like(b)
    expected[_ids(built), [0, 1]] = 1.0
    assert torch.equal(b, expected) and not b.requires_grad
    ids = built.tokenizer("a lovely film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = built.model(input_ids=ids).logits
        with built.model.disable_adapter():
            base = built.model(input_ids=ids).logits
    assert torch.equal(adapted, base)


def test_the_readout_moves_only_its_tokens_logits_by_a_dot_h() -> None:
    built = _built()
    gen = torch.Generator().manual_seed(3)
    a = built.model.get_parameter(HEAD_A)
    with torch.no_grad():
        a.copy_(torch.randn(a.shape, generator=gen))
        ids = built.tokenizer("rude staff and a cold room", return_tensors="pt")["input_ids"]
        out = built.model(input_ids=ids, output_hidden_states=True)
        with built.model.disable_adapter():
            base = built.model(input_ids=ids).logits
    h = out.hidden_states[-1][0]  # the final (normed) state the LM head reads
    delta = (out.logits - base)[0]
    rows = _ids(built)
    others = [v for v in range(delta.shape[1]) if v not in rows]
    assert float(delta[:, others].abs().max()) == 0.0
    torch.testing.assert_close(delta[:, rows], h @ a.detach().T, rtol=1e-5, atol=1e-5)


def test_readout_with_lora_in_the_layers_keeps_their_lora() -> None:
    built = _built(top_layers=1)
    names = list(_trainable(built))
    assert HEAD_A in names
    assert {n.split(".")[-4] for n in names if "layers" in n} == {"q_proj", "v_proj"}
    assert all(".layers.1." in n for n in names if "layers" in n)  # the top layer only


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bookkeeping"])
def test_clipping_the_readout_releases_the_hand_computed_clipped_sum(clipping: str) -> None:
    built = _built()
    chats, plain = sentiment_examples(5), plain_examples(2)
    from privet.common.data import GenerationExamples

    examples = GenerationExamples(
        targets=chats.targets + plain.targets, prompts=chats.prompts + plain.prompts
    )
    data = TASK.tokenize(examples, built.tokenizer, max_length=48)
    a = built.model.get_parameter(HEAD_A)
    grads = []
    for i in range(len(data)):  # each example alone and unpadded, by autograd
        batch = TASK.collate([data[i]], int(built.tokenizer.pad_token_id))
        loss = TASK.per_example_loss(built.model, batch, device=CPU, mixed_precision="off")
        grads.append(torch.autograd.grad(loss[0], [a])[0])
    norms = [float(g.norm()) for g in grads]
    clip = float(np.median(norms))  # about half the examples are clipped
    expected = sum(g * min(1.0, clip / (n + 1e-6)) for g, n in zip(grads, norms, strict=True))
    assert isinstance(expected, torch.Tensor) and float(expected.abs().sum()) > 0
    out = released_clipped_sum(built, data, TASK, clip=clip, clipping=clipping)
    assert list(out.state) == [HEAD_A]
    torch.testing.assert_close(-out.state[HEAD_A] * len(data), expected, rtol=1e-4, atol=1e-6)


def test_refusals_name_the_field_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"readout_tokens.*causal_lm.*remove adapter.readout"):
        load_config(None, ["adapter.readout_tokens=['negative','positive']"])
    with pytest.raises(ConfigError, match=r"top_layers = 0.*nothing would train"):
        load_config(None, ["adapter.top_layers=0"])
    with pytest.raises(ConfigError, match="names a token twice"):
        load_config(None, ["adapter.readout_tokens=['yes','yes']"])
    with pytest.raises(ModelError, match=r"start with the same token.*Fix: name answers"):
        _built(readout_tokens=["positive", "positively"])


ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = [
        "adapter.top_layers=0",
        "adapter.readout_tokens=['negative','positive']",
        f"federation.rounds={ROUNDS}",
        "federation.fraction_evaluate=0.0",
        "train.local_epochs=3.0",
        "train.lr=0.1",
    ]
    return simulate_causal_lm(tmp_path_factory.mktemp("readout-runs"), "readout", extra)


def test_a_dp_federation_of_the_readout_trains_and_charges_the_ledger(run: Path) -> None:
    # The tiny random model's last state does not tell the reviews apart, so the readout can
    # only learn the answers' form here (the loss); the decision is learned on SmolLM2 below.
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["server_loss"] for r in recs]
    assert losses[-1] < 0.6 * losses[0], losses  # round 0 is the base model
    eps = recs[-1]["epsilon_per_client"]
    assert len(eps) == 3 and all(0 < e <= 8.0 + 1e-6 for e in eps.values())
    saved = run / "final_adapter" / "adapter_model.safetensors"
    assert saved.stat().st_size < 20_000  # the readout's rows only, not the tied head


def test_the_readout_learns_the_decision_on_smollm2_under_dp(smollm2_dir: Path) -> None:
    cfg = ModelConfig(name=str(smollm2_dir), task="causal_lm", max_length=48)
    built = TASK.build_model(cfg, AdapterConfig(top_layers=0, readout_tokens=ANSWERS), seed=0)
    pad = int(built.tokenizer.pad_token_id)
    data = TASK.tokenize(sentiment_examples(60), built.tokenizer, max_length=48)
    test = TASK.tokenize(sentiment_examples(24, offset=1000), built.tokenizer, max_length=48)

    def exact_match() -> float:
        res = TASK.evaluate(
            built.model, test, batch_size=24, pad_token_id=pad, device=CPU, mixed_precision="off"
        )
        return float(res.metrics["exact-match"])

    before = exact_match()  # zero-shot: 16 of 24
    dp = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.5, steps=4)
    for _ in range(3):
        train(
            built.model,
            data,
            TrainConfig(lr=0.01, batch_size=30, local_epochs=2.0),
            dp=dp,
            pad_token_id=pad,
            task=TASK,
        )
    after = exact_match()  # 22 of 24 when written
    assert after >= before + 0.15 and after >= 0.83, (before, after)


def test_merged_export_is_the_trained_model_with_the_base_embeddings(
    run: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from privet.server.rundir.export import export_run

    merged = export_run(run, out=tmp_path / "merged").out
    adapter = export_run(run, out=tmp_path / "adapter", merge=False).out
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    embeddings = base.get_input_embeddings().weight.detach().clone()
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    full = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert torch.equal(full.get_input_embeddings().weight, embeddings)  # untied before merging
    ids = AutoTokenizer.from_pretrained(str(adapter))("a lovely film", return_tensors="pt")
    with torch.no_grad():
        trained = peft_model(**ids).logits
        torch.testing.assert_close(full(**ids).logits, trained, rtol=1e-4, atol=1e-5)
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(**ids).logits, trained)  # the readout moved
    generate = pipeline("text-generation", model=str(merged))
    chat = [{"role": "user", "content": "Review 1: a waste of money"}]
    reply = generate(chat, max_new_tokens=2, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and not math.isnan(len(reply["content"]))


# --- the kept trunk states ------------------------------------------------------------------------


def _full_model_losses(built: BuiltModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the per-example loss is without kept states: the whole model's forward pass."""
    from privet.common.data.text import IGNORE_INDEX

    batch = dict(batch)
    labels = batch.pop("labels").index_select(1, batch["logits_to_keep"])
    logits = built.model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.sum(dim=1) / (target != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def _decoder_calls(built: BuiltModel) -> list[int]:
    calls: list[int] = []
    decoder = built.model.get_base_model().get_decoder()
    decoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_kept_trunk_states_give_the_whole_models_losses_and_skip_the_layers() -> None:
    from privet.common.data import GenerationExamples
    from privet.common.tasks import TRUNK_STATES

    built = _built()
    with torch.no_grad():
        built.model.get_parameter(HEAD_A).normal_(generator=torch.Generator().manual_seed(1))
    chats, plain = sentiment_examples(5), plain_examples(2)
    examples = GenerationExamples(
        targets=chats.targets + plain.targets, prompts=chats.prompts + plain.prompts
    )
    data = TASK.tokenize(examples, built.tokenizer, max_length=48)
    pad = int(built.tokenizer.pad_token_id)
    calls = _decoder_calls(built)
    # Rows in two micro-batches, then all together: other widths and other first kept positions.
    for rows in ([0, 5, 2], [1, 3, 4, 6], list(range(7))):
        batch = TASK.collate([data[i] for i in rows], pad)
        with torch.no_grad():
            expected = _full_model_losses(built, batch)
        calls.clear()
        got = TASK.per_example_loss(built.model, dict(batch), device=CPU, mixed_precision="off")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert got.requires_grad  # through the head's readout
        if rows == list(range(7)):
            assert calls == []  # every row's states were kept: the layers did not run
    assert TRUNK_STATES.bytes > 0
    # An in-place change of a frozen weight of the layers invalidates what was kept.
    norm = built.model.get_base_model().model.norm.weight
    with torch.no_grad():
        norm.mul_(2.0)
    batch = TASK.collate([data[0]], pad)
    with torch.no_grad():
        expected = _full_model_losses(built, batch)
    calls.clear()
    got = TASK.per_example_loss(built.model, dict(batch), device=CPU, mixed_precision="off")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert calls == [1]


def test_layers_that_train_are_never_skipped() -> None:
    built = _built(top_layers=1)
    data = TASK.tokenize(sentiment_examples(3), built.tokenizer, max_length=48)
    batch = TASK.collate([data[i] for i in range(3)], int(built.tokenizer.pad_token_id))
    calls = _decoder_calls(built)
    for _ in range(2):
        TASK.per_example_loss(built.model, dict(batch), device=CPU, mixed_precision="off")
    assert calls == [1, 1]


def test_the_readout_step_skips_the_wide_head_with_the_same_losses_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warm rows cost ``A h`` and an ``R + 1``-way softmax: same per-example loss and gradient."""
    from privet.common.data import GenerationExamples
    from privet.common.tasks import TRUNK_STATES, ReadoutHead

    TRUNK_STATES.clear()  # kept by content: another test's identical model may have kept them
    built = _built()
    head = built.model.get_base_model().lm_head
    readout = ReadoutHead.of(head)
    assert readout is not None and readout.rows.tolist() == sorted(_ids(built))
    a = built.model.get_parameter(HEAD_A)
    with torch.no_grad():
        a.normal_(generator=torch.Generator().manual_seed(2))
    # Chats (labels on the readout rows, then the end token) and plain text (labels elsewhere).
    chats, plain = sentiment_examples(4), plain_examples(2)
    examples = GenerationExamples(
        targets=chats.targets + plain.targets, prompts=chats.prompts + plain.prompts
    )
    data = TASK.tokenize(examples, built.tokenizer, max_length=48)
    batch = TASK.collate([data[i] for i in range(len(data))], int(built.tokenizer.pad_token_id))
    wide: list[int] = []
    head.base_layer.register_forward_hook(lambda *_: wide.append(1))
    fixed: list[int] = []
    compute = ReadoutHead.fixed

    def counted(*args: Any) -> torch.Tensor:
        fixed.append(1)
        return compute(*args)

    monkeypatch.setattr(ReadoutHead, "fixed", counted)
    for attempt in range(2):  # cold (the fixed part is computed), then warm (it is kept)
        wide.clear()
        fixed.clear()
        got = TASK.per_example_loss(built.model, dict(batch), device=CPU, mixed_precision="off")
        assert wide == [] and len(fixed) == (len(data) if attempt == 0 else 0)
        expected = _full_model_losses(built, batch)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for i in range(len(data)):
            (g,) = torch.autograd.grad(got[i], [a], retain_graph=True)
            (e,) = torch.autograd.grad(expected[i], [a], retain_graph=True)
            assert float(e.abs().sum()) > 0
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_a_head_that_is_not_a_few_frozen_rows_takes_the_whole_head() -> None:
    from privet.common.tasks import ReadoutHead

    built = _built()
    head = built.model.get_base_model().lm_head
    b = head.lora_B["default"].weight
    b.requires_grad_(True)  # a trainable B moves every row
    assert ReadoutHead.of(head) is None
    b.requires_grad_(False)
    assert ReadoutHead.of(head) is not None
    with built.model.disable_adapter():
        assert ReadoutHead.of(head) is None
    with torch.no_grad():
        b.fill_(1.0)  # every row moves
    assert ReadoutHead.of(head) is None


def test_replicas_of_one_base_model_share_the_kept_states() -> None:
    """A client playing on another lane's replica next round finds its chats' states kept."""
    first, second = _built(), _built()
    data = TASK.tokenize(sentiment_examples(4), first.tokenizer, max_length=48)
    batch = TASK.collate([data[i] for i in range(4)], int(first.tokenizer.pad_token_id))
    TASK.per_example_loss(first.model, dict(batch), device=CPU, mixed_precision="off")
    calls = _decoder_calls(second)
    with torch.no_grad():
        expected = _full_model_losses(second, batch)
    calls.clear()
    got = TASK.per_example_loss(second.model, dict(batch), device=CPU, mixed_precision="off")
    assert calls == []  # the second replica's layers did not run
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # A replica whose frozen weights differ has its own states.
    with torch.no_grad():
        second.model.get_base_model().model.norm.weight.mul_(0.5)
        expected = _full_model_losses(second, batch)
    calls.clear()
    got = TASK.per_example_loss(second.model, dict(batch), device=CPU, mixed_precision="off")
    assert calls == [1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
