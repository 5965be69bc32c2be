"""Ghost clipping (Opacus fast gradient clipping) releases the same clipped sum as per-sample hooks."""

import numpy as np
import pytest
import torch

from privet.client import DPSettings, train
from privet.common.config import TrainConfig
from privet.common.data import Examples, TokenizedExamples

from .conftest import tiny_model

TEXTS = [
    "a wonderful, moving film",
    "dull and far too long",
    "I loved every minute of it",
    "the worst meal I ever had",
    "great value, works perfectly",
    "broke after two days",
    "brilliant acting throughout",
    "a waste of money",
]


def _run(clipping: str, method: str, clip: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    built = tiny_model(method=method)
    ex = Examples(texts=TEXTS, labels=np.array([i % 2 for i in range(len(TEXTS))], dtype=np.int64))
    data = TokenizedExamples(ex, built.tokenizer, max_length=32)
    cfg = TrainConfig(
        optimizer="sgd", momentum=0.0, lr=0.5, batch_size=8, physical_batch_size=3, local_epochs=1.0
    )
    # Noise 1e-12: the released update is the clipped sum itself (the mechanism refuses exactly 0).
    dp = DPSettings(
        noise_multiplier=1e-12,
        max_grad_norm=clip,
        sample_rate=1.0,
        steps=1,
        clipping=clipping,  # type: ignore[arg-type]
    )
    out = train(built.model, data, cfg, dp=dp, pad_token_id=int(built.tokenizer.pad_token_id))
    assert not any(hasattr(p, "_norm_sample") for p in built.model.parameters())
    return out.state, built.trainable_keys


@pytest.mark.parametrize(("method", "clip"), [("lora", 0.05), ("full", 0.5)])
def test_ghost_and_flat_clipping_release_the_same_update(method: str, clip: float) -> None:
    start, _ = _start(method)
    flat, keys = _run("flat", method, clip)
    ghost, _ = _run("ghost", method, clip)
    assert set(flat) == set(ghost) == set(keys)
    moved = 0
    for k in flat:
        torch.testing.assert_close(ghost[k], flat[k], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(flat[k], start[k]))
    assert moved == len(flat), "every trainable weight must move in one step"
    # ... and the clip was active: without it the update is a different one.
    unclipped, _ = _run("ghost", method, 1e6)
    assert any(not torch.allclose(unclipped[k], ghost[k], rtol=1e-3, atol=1e-5) for k in ghost)


def _start(method: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    built = tiny_model(method=method)
    return {
        n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad
    }, built.trainable_keys
