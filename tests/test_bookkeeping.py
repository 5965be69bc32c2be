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


# --- Exact numbers on hand-made inputs (mutation testing: docs/testing.md, "Clipping and noise") ---

_FIX = "Fix: use privacy.clipping = 'ghost' or 'flat' (Opacus's per-layer support)"


def test_clip_factor_is_opacus_min_one_clip_over_norm_plus_1e_6() -> None:
    """One weight, loss ``w * x_i``: example i's gradient is ``x_i``, its norm ``|x_i|``."""
    model = nn.Linear(1, 1, bias=False).double()
    clip = 1e-4
    clipper = BookKeepingClipper(model, max_grad_norm=clip)
    x = [1e-3, 2.0, 0.0, -5e-5]
    clipper.start_microbatch()
    clipper.backward(model(torch.tensor(x, dtype=torch.float64).view(-1, 1)).view(-1))
    assert clipper.last_norms is not None
    assert clipper.last_norms.tolist() == [1e-3, 2.0, 0.0, 5e-5]
    # 1e-3 and 2.0 are clipped (factor C / (norm + 1e-6)); 0 and 5e-5 are kept (factor 1).
    expected = 1e-3 * clip / (1e-3 + 1e-6) + 2.0 * clip / (2.0 + 1e-6) + 0.0 - 5e-5
    assert model.weight.grad is not None
    assert float(model.weight.grad) == pytest.approx(expected, rel=1e-12, abs=0)
    # A second micro-batch adds its clipped sum to the first's.
    clipper.start_microbatch()
    clipper.backward(model(torch.tensor([[3.0]], dtype=torch.float64)).view(-1))
    expected += 3.0 * clip / (3.0 + 1e-6)
    assert float(model.weight.grad) == pytest.approx(expected, rel=1e-12, abs=0)
    clipper.close()


class _Edges(nn.Module):
    """The corner cases of the covered layers, in one model.

    A layer that runs but does not reach the loss (recorded first, so the layers after it still
    count), a LayerNorm with a frozen weight (bias only), a Linear with a frozen bias, one without a
    bias, and a LayerNorm with a non-default eps on 2-D input (no position dimension to sum over).
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.unused = nn.Linear(4, 4)
        self.bias_only = nn.LayerNorm(4)
        self.bias_only.weight.requires_grad_(False)
        self.frozen_bias = nn.Linear(4, 4)
        self.frozen_bias.bias.requires_grad_(False)
        self.flat_norm = nn.LayerNorm(4, eps=0.5)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        self.unused(h)  # runs, but its output is thrown away
        h = torch.tanh(self.frozen_bias(self.bias_only(h))).mean(dim=1)
        return self.head(self.flat_norm(h))


def test_corner_cases_match_one_backward_per_example_in_float64() -> None:
    torch.manual_seed(1)
    model = _Edges().double()
    with torch.no_grad():  # away from LayerNorm's initial 1 and 0, so every term counts
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    ids, y = torch.randint(0, 7, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in trainable}
    for i in range(len(y)):
        m = copy.deepcopy(model)
        loss = nn.functional.cross_entropy(m(ids[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(
            loss, [dict(m.named_parameters())[n] for n in trainable], allow_unused=True
        )
        for n, gr in zip(trainable, grads, strict=True):
            rows[n].append(torch.zeros_like(trainable[n]) if gr is None else gr)
    per_sample = {n: torch.stack(r) for n, r in rows.items()}
    norms = torch.stack([s.flatten(1).norm(dim=1) for s in per_sample.values()]).norm(dim=0)
    clip = float(norms.median())  # some examples clipped, some not
    c = (clip / (norms + 1e-6)).clamp(max=1.0)

    clipper = BookKeepingClipper(model, max_grad_norm=clip)
    clipper.start_microbatch()
    clipper.backward(nn.functional.cross_entropy(model(ids), y, reduction="none"))
    clipper.close()
    assert clipper.last_norms is not None and clipper.last_norms.dtype == torch.float64
    torch.testing.assert_close(clipper.last_norms, norms, rtol=1e-12, atol=0)
    for n, p in trainable.items():
        if n.startswith("unused."):
            assert p.grad is None, n  # no gradient reached it, nothing is released for it
            continue
        assert p.grad is not None, n
        torch.testing.assert_close(
            p.grad, torch.einsum("b,b...->...", c, per_sample[n]), rtol=1e-12, atol=1e-15
        )
    assert model.bias_only.weight.grad is None and model.frozen_bias.bias.grad is None


def test_a_float32_layer_norm_on_bfloat16_activations_gets_a_float32_gradient() -> None:
    ln = nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.add_(0.5)
        ln.bias.add_(0.25)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    clipper = BookKeepingClipper(ln, max_grad_norm=1e6)
    clipper.start_microbatch()
    clipper.backward(ln(x).float().pow(2).sum(dim=(1, 2)))
    clipper.close()
    ref = copy.deepcopy(ln)
    ref(x).float().pow(2).sum().backward()
    for got, want in ((ln.weight.grad, ref.weight.grad), (ln.bias.grad, ref.bias.grad)):
        assert got is not None and want is not None and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_hooks_sit_on_the_modules_with_trainable_weights_until_closed() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.ReLU(), nn.Linear(3, 2), nn.Linear(2, 2))
    model[3].requires_grad_(False)
    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    assert clipper.last_norms is None
    assert clipper.modules == [model[0], model[2]]
    assert [bool(m._forward_hooks) for m in model] == [True, False, True, False]
    clipper.close()
    assert not any(m._forward_hooks for m in model)


def _refusal(model: nn.Module) -> str:
    with pytest.raises(PrivacyError) as exc:
        BookKeepingClipper(model, max_grad_norm=1.0)
    return str(exc.value)


@pytest.mark.parametrize("kw", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}])
def test_each_unsupported_embedding_option_is_refused_word_for_word(kw: dict[str, object]) -> None:
    assert _refusal(nn.Sequential(nn.Embedding(5, 3, **kw))) == (  # type: ignore[arg-type]
        "book-keeping clipping cannot clip this model: embedding '0' uses max_norm, "
        f"scale_grad_by_freq or sparse gradients. {_FIX}"
    )


def test_uncovered_and_shared_layers_are_refused_word_for_word() -> None:
    assert _refusal(nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))) == (
        "book-keeping clipping cannot clip this model: layer '1' (Conv1d) has trainable "
        f"weights. {_FIX}"
    )
    emb, out = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    out.weight = emb.weight
    assert _refusal(nn.Sequential(emb, out)) == (
        "book-keeping clipping cannot clip this model: layers '0' and '1' share a trainable "
        f"weight. {_FIX}"
    )
    first, second = nn.LayerNorm(4), nn.LayerNorm(4)
    second.weight = first.weight
    assert _refusal(nn.Sequential(first, second)) == (
        "book-keeping clipping cannot clip this model: layers '0' and '1' share a trainable "
        f"weight. {_FIX}"
    )


def test_a_layer_run_twice_or_none_run_is_refused_word_for_word() -> None:
    lin = nn.Linear(3, 3)
    clipper = BookKeepingClipper(lin, max_grad_norm=1.0)
    clipper.start_microbatch()
    with pytest.raises(PrivacyError) as twice:
        lin(lin(torch.randn(2, 3)))
    assert str(twice.value) == (
        "book-keeping clipping: Linear ran twice in one forward pass, so its per-example "
        "gradient norm cannot be computed layer by layer. "
        "Fix: use privacy.clipping = 'ghost' or 'flat'"
    )
    clipper.start_microbatch()
    with torch.no_grad():  # nothing is recorded without autograd
        lin(torch.randn(2, 3))
    with pytest.raises(PrivacyError) as none:
        clipper.backward(torch.randn(2, requires_grad=True) * 2)
    assert str(none.value) == (
        "book-keeping clipping saw no trainable layer run in the forward pass. "
        "Fix: use privacy.clipping = 'flat'"
    )
    clipper.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_norms_and_clipped_sum_stay_on_the_model_device() -> None:
    """The per-example norms are formed on the model's device (CPU runs cannot tell)."""
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(1)
        model = _Edges().double().to(device)
        g = torch.Generator().manual_seed(5)
        ids, y = torch.randint(0, 7, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
        clipper = BookKeepingClipper(model, max_grad_norm=0.1)
        clipper.start_microbatch()
        loss = nn.functional.cross_entropy(model(ids.to(device)), y.to(device), reduction="none")
        clipper.backward(loss)
        clipper.close()
        assert clipper.last_norms is not None and clipper.last_norms.device.type == device
        results.append((clipper.last_norms.cpu(), model.head.weight.grad.cpu()))  # type: ignore[union-attr]
    for cpu, cuda in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-10, atol=1e-12)
