"""Book-keeping clipping releases the clipped per-example gradient sum of Opacus's per-sample hooks."""

import copy

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from privet.client import DPSettings, train
from privet.client.bookkeeping import BookKeepingClipper
from privet.common.config import TrainConfig
from privet.common.data import Examples, TokenizedExamples
from privet.common.errors import PrivacyError

from .conftest import tiny_model
from .test_ghost_clipping import TEXTS


class _Small(nn.Module):
    """Every covered layer type: Embedding (with padding), LayerNorm, Linear on 3-D and 2-D inputs."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 5)
        self.wide = nn.Linear(5, 40)  # t * (d_in + d_out) > d_in * d_out: the direct norm path
        self.head = nn.Linear(40, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.norm(self.emb(ids))))
        h = torch.tanh(self.wide(h)).mean(dim=1)
        return self.head(h)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (7, 9), generator=g)
    ids[:, 6:] = 0  # padding
    ids[2, 1] = ids[2, 4] = 5  # a repeated token within one example
    return ids, torch.randint(0, 3, (7,), generator=g)


def _per_sample(model: nn.Module, opacus: bool) -> dict[str, torch.Tensor]:
    """Per-example gradients: Opacus's hooks, or one plain backward per example (the definition)."""
    ids, y = _data()
    if opacus:
        gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="sum")
        nn.functional.cross_entropy(gsm(ids), y, reduction="sum").backward()
        return {n: p.grad_sample for n, p in gsm._module.named_parameters()}  # type: ignore[misc]
    m = copy.deepcopy(model)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, _ in m.named_parameters()}
    for i in range(len(y)):
        m.zero_grad()
        nn.functional.cross_entropy(m(ids[i : i + 1]), y[i : i + 1]).backward()
        for n, p in m.named_parameters():
            rows[n].append(p.grad.clone())  # type: ignore[union-attr]
    return {n: torch.stack(r) for n, r in rows.items()}


def _reference(
    model: nn.Module, clip: float, opacus: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients clipped with Opacus's factor and summed, and their norms."""
    grads = _per_sample(model, opacus)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    c = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", c, g) for n, g in grads.items()}, norms


# Opacus's embedding sampler ignores padding_idx (it gives the padding row a per-sample gradient
# nn.Embedding never applies), so with padding the reference is one backward per example.
@pytest.mark.parametrize(("padding_idx", "opacus"), [(None, True), (0, False)])
@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_clipped_sum_matches_per_sample_clipping(
    clip: float, padding_idx: int | None, opacus: bool
) -> None:
    torch.manual_seed(0)
    model = _Small(padding_idx).double()
    ref, ref_norms = _reference(model, clip, opacus)
    clipper = BookKeepingClipper(model, max_grad_norm=clip)
    ids, y = _data()
    clipper.start_microbatch()
    per_example = nn.functional.cross_entropy(model(ids), y, reduction="none")
    clipper.backward(per_example)
    clipper.close()
    got = {n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(ref)
    for n in ref:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
    assert clipper.last_norms is not None
    torch.testing.assert_close(clipper.last_norms, ref_norms, rtol=1e-5, atol=1e-7)
    # Every example's clipped gradient has norm <= the clip; with a small clip, all are clipped.
    clipped = ref_norms * (clip / (ref_norms + 1e-6)).clamp(max=1.0)
    assert bool((clipped <= clip).all())
    if clip < 1:
        assert bool((ref_norms > clip).all())
    if padding_idx is not None:  # the padding row gets no gradient
        assert float(model.emb.weight.grad[padding_idx].abs().sum()) == 0.0  # type: ignore[index]
    assert not model._forward_hooks and not model.emb._forward_hooks


def test_uncovered_trainable_layer_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(PrivacyError, match="Conv1d"):
        BookKeepingClipper(model, max_grad_norm=1.0)
    # Frozen, it needs no clipping and is allowed.
    model[1].requires_grad_(False)
    BookKeepingClipper(model, max_grad_norm=1.0).close()


def test_shared_weight_is_refused() -> None:
    emb = nn.Embedding(5, 4)
    out = nn.Linear(4, 5, bias=False)
    out.weight = emb.weight
    with pytest.raises(PrivacyError, match="share"):
        BookKeepingClipper(nn.Sequential(emb, out), max_grad_norm=1.0)


def test_layer_called_twice_is_refused() -> None:
    lin = nn.Linear(3, 3)
    clipper = BookKeepingClipper(lin, max_grad_norm=1.0)
    clipper.start_microbatch()
    with pytest.raises(PrivacyError, match="twice"):
        lin(lin(torch.randn(2, 3)))


def test_bookkeeping_and_flat_release_the_same_update_in_training() -> None:
    """Through ``train``: same batches, same noise generator, so the same released weights."""
    states = {}
    for clipping in ("flat", "bookkeeping"):
        built = tiny_model(method="full")
        ex = Examples(
            texts=TEXTS, labels=np.array([i % 2 for i in range(len(TEXTS))], dtype=np.int64)
        )
        data = TokenizedExamples(ex, built.tokenizer, max_length=32)
        cfg = TrainConfig(
            optimizer="sgd",
            momentum=0.0,
            lr=0.5,
            batch_size=8,
            physical_batch_size=3,
            local_epochs=1.0,
        )
        dp = DPSettings(
            noise_multiplier=0.3,
            max_grad_norm=0.5,
            sample_rate=1.0,
            steps=2,
            clipping=clipping,  # type: ignore[arg-type]
        )
        out = train(built.model, data, cfg, dp=dp, pad_token_id=int(built.tokenizer.pad_token_id))
        assert not any(m._forward_hooks for m in built.model.modules())
        states[clipping] = out.state
    for k in states["flat"]:
        torch.testing.assert_close(
            states["bookkeeping"][k], states["flat"][k], rtol=1e-4, atol=1e-6
        )
