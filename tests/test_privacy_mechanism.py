"""Sample-level mechanism, measured through privet's own ``train``: clipping bound and noise scale.

The model is the audit's canary model (one embedding row per token, logits = sum of rows), so an
example's gradient lives only in its own tokens' rows and can be read back from the update.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privet.client.training import DPSettings, train
from privet.common.config import ClientLevelConfig, FederationConfig, TrainConfig
from privet.common.data import Examples, TokenizedExamples
from privet.common.privacy.federation import plan_federation
from privet.simulations.audit import _CanaryModel, _IdTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")

SGD = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, batch_size=1, physical_batch_size=16)


def _data(texts: list[str], labels: list[int]) -> TokenizedExamples:
    return TokenizedExamples(
        Examples(texts=texts, labels=np.array(labels, dtype=np.int64)), _IdTokenizer(), max_length=8
    )


def test_every_clipped_per_sample_gradient_is_within_the_clip() -> None:
    # Example i uses tokens 2i and 2i+1 (repeated so some gradients are far above the clip).
    n, clip = 40, 0.3
    rng = np.random.default_rng(0)
    texts = [" ".join([str(2 * i)] * int(rng.integers(1, 4)) + [str(2 * i + 1)]) for i in range(n)]
    data = _data(texts, [int(y) for y in rng.integers(0, 2, n)])
    model = _CanaryModel(2 * n)
    # Its own generator: the global one's state depends on which tests ran before on this worker,
    # and how many gradients exceed the clip depends on these weights.
    torch.nn.init.normal_(model.emb.weight, std=3.0, generator=torch.Generator().manual_seed(0))
    before = model.emb.weight.detach().clone()
    dp = DPSettings(noise_multiplier=1e-12, max_grad_norm=clip, sample_rate=1.0, steps=1)
    train(model, data, SGD, dp=dp, pad_token_id=0, seed=0)
    # SGD, lr 1, mean over the expected batch n: the update of example i's rows is -g_i / n.
    delta = (model.emb.weight.detach() - before).view(n, -1) * n
    norms = delta.norm(dim=1)
    # (the read-back through float32 weights of std 3 costs ~1e-5 relative)
    assert (norms <= clip * (1 + 1e-4)).all()
    assert (norms > clip * 0.999).sum() >= n // 2  # most were clipped to exactly the clip


@pytest.mark.parametrize(("sigma", "clip"), [(1.0, 1.0), (0.7, 0.25)])
def test_noise_std_is_sigma_times_clip_over_batch(sigma: float, clip: float) -> None:
    rows, n, q = 20_001, 64, 0.5
    data = _data(["0"] * n, [0] * n)  # every example touches row 0 only
    model = _CanaryModel(rows)
    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, steps=1)
    train(model, data, SGD, dp=dp, pad_token_id=0, seed=3)
    noise = model.emb.weight.detach()[1:].double().numpy()  # rows no example touches
    expected = sigma * clip / round(q * n)
    assert abs(noise.mean()) < 0.02 * expected
    assert noise.std() == pytest.approx(expected, rel=0.02)


def test_an_empty_batch_releases_noise_of_std_sigma_times_clip_over_the_expected_batch() -> None:
    """The noise-only step divides by the expected batch size, as a non-empty step does."""
    rows, n, sigma, clip = 20_001, 64, 0.7, 0.25
    model = _CanaryModel(rows)
    before = model.emb.weight.detach().clone()
    # q * n = 2 examples expected; with seed 5 the one Poisson batch happens to be empty.
    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=2 / n, steps=1)
    out = train(model, _data(["0"] * n, [0] * n), SGD, dp=dp, pad_token_id=0, seed=5)
    assert out.examples_seen == 0 and out.steps == 1
    noise = (model.emb.weight.detach() - before).double().numpy()  # SGD, lr 1: -noise
    expected = sigma * clip / 2
    assert abs(noise.mean()) < 0.02 * expected
    assert noise.std() == pytest.approx(expected, rel=0.02)
    assert all(p.grad is None for p in model.parameters())


# RDP with q < 1 costs ~0.3 s per evaluation: few examples, two evaluations each.
@settings(max_examples=8, deadline=None)
@given(
    z=st.floats(min_value=0.5, max_value=5.0),
    rounds=st.integers(min_value=1, max_value=200),
    amplify=st.booleans(),
)
def test_federation_epsilon_is_monotone_in_rounds(z: float, rounds: int, amplify: bool) -> None:
    cl = ClientLevelConfig(enabled=True, noise_multiplier=z, sampling_amplification=amplify)
    fed = FederationConfig(rounds=rounds + 1, fraction_train=0.1, min_train_clients=2)
    mech = plan_federation(cl, fed, num_clients=20)
    assert mech.sample_rate == (0.1 if amplify else 1.0)
    assert 0.0 < mech.epsilon_after(rounds) <= mech.epsilon_after(rounds + 1)


@settings(max_examples=10, deadline=None)
@given(
    target=st.floats(min_value=0.5, max_value=20.0), rounds=st.integers(min_value=1, max_value=30)
)
def test_federation_noise_search_never_overshoots(target: float, rounds: int) -> None:
    cl = ClientLevelConfig(enabled=True, target_epsilon=target)
    mech = plan_federation(cl, FederationConfig(rounds=rounds, min_train_clients=2), num_clients=20)
    assert mech.epsilon_after(rounds) <= target
    assert math.isfinite(mech.noise_multiplier) and mech.noise_multiplier > 0
