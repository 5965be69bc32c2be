"""FedProx on the client: the proximal term's gradient, by hand and through ``train``."""

import numpy as np
import pytest
import torch

from privet.client import DPSettings, train
from privet.client.training import add_proximal_gradient
from privet.common.config import TrainConfig
from privet.common.data import Examples, TokenizedExamples
from privet.common.modeling import trainable_state

from .conftest import tiny_model

TEXTS = [
    "a wonderful film",
    "dull and long",
    "I loved it",
    "the worst meal",
    "great value",
    "broke",
]


def test_proximal_gradient_is_mu_times_distance_to_the_anchor() -> None:
    # loss = (w . x) + (mu/2) ||w - a||^2  ->  grad = x + mu (w - a)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    a = torch.tensor([0.0, 1.0, 1.0])
    x = torch.tensor([0.5, 0.5, -1.0])
    (w * x).sum().backward()  # type: ignore[no-untyped-call]
    add_proximal_gradient([w], [a], mu=0.25)  # w - a = [1, -3, 2]
    assert torch.equal(w.grad, torch.tensor([0.75, -0.25, -0.5]))
    # Same as autograd on the full FedProx objective.
    v = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ((v * x).sum() + 0.125 * ((v - a) ** 2).sum()).backward()  # type: ignore[no-untyped-call]
    assert torch.allclose(w.grad, v.grad, atol=0, rtol=1e-6)


def test_mu_zero_leaves_the_gradient_alone() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w.grad = torch.tensor([3.0, 4.0])
    add_proximal_gradient([w], [torch.zeros(2)], mu=0.0)
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))


def _cfg() -> TrainConfig:
    # plain SGD, one full batch per step, two steps
    return TrainConfig(
        optimizer="sgd", momentum=0.0, lr=0.5, batch_size=6, physical_batch_size=6, local_epochs=2.0
    )


@pytest.mark.parametrize("private", [False, True])
def test_train_adds_exactly_the_proximal_step(private: bool) -> None:
    """Two SGD steps from w0: step 1 has no proximal pull (w = anchor); step 2 differs by exactly
    -lr * mu * (w1 - w0), since both runs see the same batches, the same noise and the same w1."""
    data_model = tiny_model()
    ex = Examples(texts=TEXTS, labels=np.array([1, 0, 1, 0, 1, 0], dtype=np.int64))
    data = TokenizedExamples(ex, data_model.tokenizer, max_length=32)
    pad = int(data_model.tokenizer.pad_token_id)
    dp = (
        DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=1.0, steps=2)
        if private
        else None
    )
    cfg, mu, lr = _cfg(), 0.3, 0.5
    w0 = trainable_state(data_model.model)

    one = tiny_model()
    w1 = train(
        one.model,
        data,
        cfg.model_copy(update={"local_epochs": 1.0}),
        dp=dp and DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=1.0, steps=1),
        pad_token_id=pad,
        seed=3,
    ).state
    plain = train(tiny_model().model, data, cfg, dp=dp, pad_token_id=pad, seed=3).state
    prox = train(
        tiny_model().model, data, cfg, dp=dp, pad_token_id=pad, seed=3, proximal_mu=mu
    ).state
    moved = 0
    for k in w0:
        expected = plain[k] - lr * mu * (w1[k] - w0[k])
        assert torch.allclose(prox[k], expected, rtol=1e-4, atol=1e-6), k
        moved += int(not torch.equal(prox[k], plain[k]))
    assert moved > 0  # the term did something


def test_negative_mu_is_refused() -> None:
    built = tiny_model()
    ex = Examples(texts=TEXTS, labels=np.zeros(6, dtype=np.int64))
    data = TokenizedExamples(ex, built.tokenizer, max_length=32)
    with pytest.raises(ValueError, match="proximal_mu"):
        train(built.model, data, _cfg(), dp=None, pad_token_id=0, proximal_mu=-1.0)
