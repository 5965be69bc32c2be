"""The DP-SGD mechanism in privet.client.train, checked against hand computations."""

import math

import numpy as np
import pytest
import torch

from privet.client import DPSettings, plan_steps, train
from privet.common.config import TrainConfig
from privet.common.data import Examples, TokenizedExamples, collate
from privet.common.errors import PrivacyError
from privet.common.modeling import trainable_state

from .conftest import tiny_model

TEXTS = [
    "a wonderful, moving film",
    "dull and far too long",
    "I loved every minute",
    "the worst meal I ever had",
    "great value, works perfectly",
    "broke after two days",
    "brilliant acting throughout",
    "a waste of money",
    "charming and funny",
    "terrible customer service",
    "highly recommended",
    "never again",
]


def _data(built, n: int = 12) -> TokenizedExamples:
    ex = Examples(texts=TEXTS[:n], labels=np.array([i % 2 == 0 for i in range(n)], dtype=np.int64))
    return TokenizedExamples(ex, built.tokenizer, max_length=32)


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _cfg(**kw: object) -> TrainConfig:
    base = {
        "optimizer": "sgd",
        "momentum": 0.0,
        "lr": 0.5,
        "batch_size": 12,
        "physical_batch_size": 5,
        "local_epochs": 1.0,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_dp_step_without_noise_or_clipping_equals_plain_training() -> None:
    plain, private = tiny_model(), tiny_model()
    data = _data(plain)
    pad = int(plain.tokenizer.pad_token_id)
    out_plain = train(plain.model, data, _cfg(), dp=None, pad_token_id=pad)
    # q = 1: every example is in the one Poisson batch, exactly as in the plain full batch.
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=math.inf, sample_rate=1.0, steps=1)
    out_dp = train(private.model, data, _cfg(), dp=dp, pad_token_id=pad)
    assert out_plain.steps == out_dp.steps == 1
    before = trainable_state(tiny_model().model)
    for k in out_plain.state:
        assert not torch.equal(out_plain.state[k], before[k]), f"{k} did not move"
        torch.testing.assert_close(out_dp.state[k], out_plain.state[k], rtol=1e-4, atol=1e-6)


def test_dp_step_clips_each_example_exactly_like_a_hand_computation() -> None:
    """Per-sample gradients of the LoRA B matrices and head, clipped one by one (opacus #820 guard)."""
    ref, private = tiny_model(), tiny_model()
    data = _data(ref)
    pad = int(ref.tokenizer.pad_token_id)
    clip = 0.05
    params = [p for p in ref.model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(data)):
        batch = collate([data[i]], pad)
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(ref.model(**batch).logits, labels)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (float(norm) + 1e-6))
    assert min(norms) > clip, "the test needs every example to be clipped"
    lr = 0.5
    expected = {
        n: p.detach() - lr * t / len(data)
        for (n, p), t in zip(
            [(n, p) for n, p in ref.model.named_parameters() if p.requires_grad], total, strict=True
        )
    }
    dp = DPSettings(noise_multiplier=1e-12, max_grad_norm=clip, sample_rate=1.0, steps=1)
    out = train(private.model, data, _cfg(lr=lr), dp=dp, pad_token_id=pad)
    for k, v in expected.items():
        torch.testing.assert_close(out.state[k], v, rtol=1e-4, atol=1e-6)


def test_dp_changes_exactly_the_trainable_weights() -> None:
    built = tiny_model()
    data = _data(built)
    frozen_before = _frozen(built.model)
    start = trainable_state(built.model)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=3)
    out = train(
        built.model,
        data,
        _cfg(optimizer="adamw", lr=1e-2),
        dp=dp,
        pad_token_id=int(built.tokenizer.pad_token_id),
    )
    assert out.steps == 3
    for k, v in out.state.items():
        assert not torch.equal(v, start[k]), f"DP update left {k} unchanged"
        assert torch.isfinite(v).all()
    for n, p in built.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    # no Opacus state is left on the caller's model
    assert not any(hasattr(p, "grad_sample") for p in built.model.parameters())


def test_noise_is_seeded_and_matters() -> None:
    outs = []
    for seed in (1, 1, 2):
        built = tiny_model()
        dp = DPSettings(noise_multiplier=2.0, max_grad_norm=1.0, sample_rate=0.5, steps=2)
        outs.append(
            train(built.model, _data(built), _cfg(), dp=dp, pad_token_id=0, seed=seed).state
        )
    k = next(iter(outs[0]))
    assert torch.equal(outs[0][k], outs[1][k])
    assert not torch.equal(outs[0][k], outs[2][k])


def test_an_empty_poisson_batch_still_takes_a_noisy_step() -> None:
    built = tiny_model()
    data = _data(built, n=2)
    start = trainable_state(built.model)
    # q tiny: the batches are (almost surely) empty, yet noise must still be released
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-9, steps=2)
    out = train(built.model, data, _cfg(), dp=dp, pad_token_id=0)
    assert out.examples_seen == 0 and out.steps == 2
    assert all(not torch.equal(out.state[k], start[k]) for k in start)


def test_zero_noise_is_refused_unless_clipping_is_off_too() -> None:
    built = tiny_model()
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(PrivacyError, match="no privacy"):
        train(built.model, _data(built), _cfg(), dp=dp, pad_token_id=0)


def test_plan_steps() -> None:
    assert plan_steps(1000, TrainConfig(batch_size=100, local_epochs=1.0)) == (0.1, 10)
    assert plan_steps(1000, TrainConfig(batch_size=100, local_epochs=0.25)) == (0.1, 2)
    assert plan_steps(50, TrainConfig(batch_size=100, local_epochs=2.0)) == (1.0, 2)
