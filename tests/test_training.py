"""The DP-SGD mechanism in privet.client.train, checked against hand computations."""

import math

import numpy as np
import pytest
import torch

from privet.client import DPSettings, plan_steps, train
from privet.client.bookkeeping import BookKeepingClipper
from privet.client.training import (
    _poisson_batches,
    _shuffled_batches,
    make_clipper,
    release_private,
)
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
    # Neither leaves a gradient on the caller's model (nor spends memory on one).
    assert all(p.grad is None for p in [*plain.model.parameters(), *private.model.parameters()])
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
    assert all(p.grad is None for p in built.model.parameters())


def test_zero_noise_is_refused_unless_clipping_is_off_too() -> None:
    built = tiny_model()
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=0.5, steps=1)
    with pytest.raises(PrivacyError, match="no privacy"):
        train(built.model, _data(built), _cfg(), dp=dp, pad_token_id=0)


def test_plan_steps() -> None:
    assert plan_steps(1000, TrainConfig(batch_size=100, local_epochs=1.0)) == (0.1, 10)
    assert plan_steps(1000, TrainConfig(batch_size=100, local_epochs=0.25)) == (0.1, 2)
    assert plan_steps(50, TrainConfig(batch_size=100, local_epochs=2.0)) == (1.0, 2)


def test_shuffled_batches_cut_successive_permutations_into_equal_batches() -> None:
    """Without DP: a stream of fresh permutations of the examples, cut into batches of one size."""
    n, size, steps = 5, 2, 7
    got = list(_shuffled_batches(n, size, steps, np.random.default_rng(4)))
    assert [len(b) for b in got] == [size] * steps
    rng = np.random.default_rng(4)
    stream = np.concatenate([rng.permutation(n) for _ in range(3)])  # 15 >= 7 * 2 indices
    assert np.concatenate(got).tolist() == stream[: steps * size].tolist()


def test_ghost_clipping_first_pass_skips_the_weight_gradients_it_can() -> None:
    """Pass 1 asks autograd for the trainable layers' inputs; only the embedding, whose input (token
    ids) needs no gradient, is reached through its weight, so no Linear weight gradient is formed.
    """
    model = torch.nn.Sequential(
        torch.nn.Embedding(6, 4), torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSettings(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=1, clipping="ghost"
    )
    clipper = make_clipper(model, opt, dp, n=4, device=torch.device("cpu"), seed=0)
    try:
        clipper.start_microbatch()
        logits = clipper.net(torch.tensor([[1, 2], [3, 4], [5, 1], [2, 2]])).mean(dim=1)
        targets = list(clipper.helper.targets.values())  # type: ignore[attr-defined]
        params = {id(p) for p in model.parameters()}
        assert [t for t in targets if id(t) in params] == [model[0].weight]
        assert len(targets) == 3  # the embedding's weight, the two Linears' inputs
        clipper.backward(
            torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1, 0]), reduction="none"),
            share=1.0,
            last=True,
        )
    finally:
        clipper.close()


def _linear_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 2)).to(dtype)


def _clipper(model: torch.nn.Module, **dp: object):  # type: ignore[no-untyped-def]
    settings = DPSettings(
        **{"noise_multiplier": 1.0, "max_grad_norm": 0.5, "sample_rate": 0.5, "steps": 1, **dp}
    )  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return make_clipper(model, opt, settings, n=4, device=torch.device("cpu"), seed=11)


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bookkeeping"])
def test_the_dp_optimizer_gets_the_clip_the_expected_batch_and_its_own_noise_seed(
    clipping: str,
) -> None:
    model = _linear_model()
    clipper = _clipper(model, clipping=clipping)
    try:
        opt = clipper.dp_opt
        assert opt.max_grad_norm == 0.5 and opt.noise_multiplier == 1.0
        assert opt.expected_batch_size == 2  # round(0.5 * 4)
        assert opt.loss_reduction == "mean"
        # the noise has its own generator, seeded apart from the sampler's (seed + 7919)
        assert opt.generator is not None and opt.generator.initial_seed() == 11 + 7919
        # flat and ghost run through Opacus's wrapper; book-keeping through the model itself
        assert (clipper.net is model) == (clipping == "bookkeeping")
        if clipping == "bookkeeping":
            assert isinstance(clipper.helper, BookKeepingClipper)
            assert clipper.helper.max_grad_norm == 0.5
    finally:
        clipper.close()
    # at least one expected example, and an infinite clip becomes a finite huge one for Opacus
    clipper = _clipper(_linear_model(), sample_rate=0.1, max_grad_norm=math.inf)
    try:
        assert clipper.dp_opt.expected_batch_size == 1  # round(0.4) = 0 -> 1
        assert clipper.dp_opt.max_grad_norm == 1e30
    finally:
        clipper.close()


def test_ghost_clipping_of_a_low_precision_model_is_refused_word_for_word() -> None:
    with pytest.raises(PrivacyError) as exc:
        _clipper(_linear_model(torch.bfloat16), clipping="ghost")
    assert str(exc.value) == (
        "privacy.clipping = 'ghost' cannot clip a model with ['torch.bfloat16'] weights: its two "
        "backward passes would round apart. Fix: use privacy.clipping = 'bookkeeping' or 'flat' "
        "(one pass: the clipped gradients are the ones whose norms were taken), or "
        "model.base_dtype = 'float32'"
    )
    _clipper(_linear_model(torch.bfloat16), clipping="flat").close()  # one pass: allowed


def test_zero_noise_and_an_unclippable_model_are_refused_word_for_word() -> None:
    with pytest.raises(PrivacyError) as exc:
        _clipper(_linear_model(), noise_multiplier=0.0)
    assert str(exc.value) == (
        "DP training was asked for with noise_multiplier 0, which gives no privacy. Fix: disable "
        "privacy explicitly (privacy.enabled = false) for a non-private baseline"
    )
    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(PrivacyError, match=r"layer '0' \(Conv1d\) has trainable weights"):
        _clipper(conv, clipping="bookkeeping")
    assert not any(hasattr(p, "summed_grad") for p in conv.parameters())


def test_release_private_removes_every_per_sample_attribute() -> None:
    model = _linear_model()
    attrs = ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample")
    for p in model.parameters():
        for a in attrs:
            setattr(p, a, torch.zeros(1))
    release_private(model, list(model.parameters()))
    assert not any(hasattr(p, a) for p in model.parameters() for a in attrs)


@pytest.mark.parametrize("clipping", ["flat", "ghost", "bookkeeping"])
def test_closing_a_clipper_leaves_no_hook_on_the_model(clipping: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    clipper = _clipper(model, clipping=clipping)
    assert any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    clipper.close()
    assert not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )


def test_poisson_batches_come_from_the_given_generator_as_int64_indices() -> None:
    def draw(seed: int, global_seed: int, n: int = 20, q: float = 0.5) -> list[list[int]]:
        with torch.random.fork_rng():
            torch.manual_seed(global_seed)  # the global generator must play no part
            batches = list(_poisson_batches(n, q, 4, torch.Generator().manual_seed(seed)))
        assert all(b.dtype == np.int64 for b in batches)
        return [b.tolist() for b in batches]

    assert draw(1, 0) == draw(1, 99)
    assert draw(1, 0) != draw(2, 0)
    assert draw(1, 0, n=3, q=1e-9) == [[], [], [], []]  # empty batches are int64 too


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_the_model_had(training: bool) -> None:
    """Evaluation switches dropout off for its block only, also when the block fails."""
    from privet.common.evaluation import eval_mode

    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    model.train(training)
    with eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training is training and model[0].training is training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training is training


@pytest.mark.parametrize("private", [True, False])
def test_no_autocast_under_dp_whatever_precision_was_asked(private: bool) -> None:
    """Under DP every micro-batch's loss is asked for with autocast off (per-example norms and the
    clip must be computed in full precision); without DP the caller's choice passes through.

    Autocast itself is a no-op on a CPU, so the test records what ``train`` asks the task for.
    """
    from privet.common.tasks import Classification

    asked: list[str] = []

    class Spy(Classification):
        def per_example_loss(self, model, batch, *, device, mixed_precision):  # type: ignore[no-untyped-def]
            asked.append(mixed_precision)
            return super().per_example_loss(
                model, batch, device=device, mixed_precision=mixed_precision
            )

    built = tiny_model()
    data = _data(built)
    dp = (
        DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1)
        if private
        else None
    )
    train(
        built.model,
        data,
        _cfg(),
        dp=dp,
        pad_token_id=int(built.tokenizer.pad_token_id),
        mixed_precision="bf16",
        task=Spy(),
    )
    assert asked and set(asked) == ({"off"} if private else {"bf16"})
