"""Book-keeping ghost clipping: DP-SGD's clipped gradient sum in one backward pass.

Opacus's ghost clipping (``GradSampleModuleFastGradientClipping``) runs two backward passes: the
first computes each example's gradient norm, the second backpropagates the loss reweighted by the
clipping factors to form the clipped sum. Book-keeping clipping (Bu, Wang, Zha and Karypis,
"Differentially private optimization on large model at small cost", ICML 2023) keeps what the first
pass already holds, each trainable layer's input activations ``a`` and output gradients ``g``, and
forms the clipped sum from them directly: ``sum_i c_i * g_i^T a_i`` is one matrix product per
layer. Opacus has no such mode, so this module is our own code. The noise, the optimizer step and
the accountant stay Opacus's (``DPOptimizerFastGradientClipping`` receives the clipped sum in
``p.grad``, exactly as from Opacus's ghost path).

Covered layers: ``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm``, which is everything a
BERT-style encoder such as MiniLM trains. Fail-closed: a trainable parameter held by any other
layer type, shared by two layers, or a covered layer called twice in one forward pass (its
per-example norm would not be the sum of per-call norms) stops training with a
:class:`~privet.common.errors.PrivacyError`; no layer is ever left unclipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privet.common.errors import PrivacyError

__all__ = ["BookKeepingClipper", "bookkeeping_supported"]

_COVERED = (nn.Linear, nn.Embedding, nn.LayerNorm)


@dataclass
class _Record:
    module: nn.Module
    activation: torch.Tensor
    output: torch.Tensor


def bookkeeping_supported(model: nn.Module) -> str | None:
    """Why book-keeping clipping cannot clip ``model``, or ``None`` when it covers every trainable weight."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, _COVERED):
            return f"layer {name!r} ({type(module).__name__}) has trainable weights"
        if isinstance(module, nn.Embedding) and (
            module.max_norm is not None or module.scale_grad_by_freq or module.sparse
        ):
            return f"embedding {name!r} uses max_norm, scale_grad_by_freq or sparse gradients"
        if isinstance(module, nn.LayerNorm) and not module.elementwise_affine:
            continue
        for p in own:
            if id(p) in owners:
                return f"layers {owners[id(p)]!r} and {name!r} share a trainable weight"
            owners[id(p)] = name
    return None


class BookKeepingClipper:
    """Per-example clipping of a model's trainable weights with one backward pass.

    Parameters
    ----------
    model
        The (unwrapped) model; its trainable weights must all sit in covered layers.
    max_grad_norm
        The clip ``C``: each example's gradient over all trainable weights is scaled to norm at most
        ``C`` (Opacus's factor ``min(1, C / (norm + 1e-6))``).

    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        reason = bookkeeping_supported(model)
        if reason is not None:
            raise PrivacyError(
                f"book-keeping clipping cannot clip this model: {reason}",
                fix="use privacy.clipping = 'ghost' or 'flat' (Opacus's per-layer support)",
            )
        self.max_grad_norm = max_grad_norm
        self.records: list[_Record] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.modules: list[nn.Module] = []
        for module in model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self.modules.append(module)
                self.handles.append(module.register_forward_hook(self._keep))
        #: The per-example gradient norms of the last micro-batch (before clipping).
        self.last_norms: torch.Tensor | None = None

    def _keep(self, module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            return
        if any(r.module is module for r in self.records):
            raise PrivacyError(
                f"book-keeping clipping: {type(module).__name__} ran twice in one forward pass, "
                "so its per-example gradient norm cannot be computed layer by layer",
                fix="use privacy.clipping = 'ghost' or 'flat'",
            )
        x = args[0]
        assert isinstance(x, torch.Tensor)
        self.records.append(_Record(module, x.detach(), output))

    def start_microbatch(self) -> None:
        """Forget the activations of the previous micro-batch."""
        self.records.clear()

    def backward(self, per_example: torch.Tensor) -> None:
        """Add the sum of the clipped per-example gradients of ``per_example`` to each ``p.grad``."""
        if not self.records:
            raise PrivacyError(
                "book-keeping clipping saw no trainable layer run in the forward pass",
                fix="use privacy.clipping = 'flat'",
            )
        records, self.records = self.records, []
        # One backward pass, to the layers' outputs only: autograd computes input gradients and
        # skips every weight-gradient product (those are formed below, already clipped).
        grads = torch.autograd.grad(
            per_example.sum(), [r.output for r in records], allow_unused=True
        )
        batch = per_example.shape[0]
        # Norms in at least float32, whatever the model computes in.
        dtype = torch.promote_types(per_example.dtype, torch.float32)
        sq = torch.zeros(batch, dtype=dtype, device=per_example.device)
        kept: list[tuple[_Record, torch.Tensor]] = []
        for r, g in zip(records, grads, strict=True):
            if g is None:
                continue  # the layer did not reach the loss: its per-example gradient is zero
            g = g.detach()
            sq += _norm_sq(r.module, r.activation, g).to(sq.dtype)
            kept.append((r, g))
        norms = sq.sqrt()
        self.last_norms = norms
        coeff = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for r, g in kept:
            _add_clipped_sum(r.module, r.activation, g, coeff.to(g.dtype))

    def close(self) -> None:
        """Remove the hooks; the model is left as it was given."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.records.clear()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(B, ..., d)`` to ``(B, T, d)``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _trainable(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def _norm_sq(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared per-example gradient norm of ``module``'s trainable weights, shape ``(B,)``."""
    if isinstance(module, nn.Linear):
        a3, g3 = _flat(a), _flat(g)
        out = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        if _trainable(module.weight):
            t, d_in, d_out = a3.shape[1], a3.shape[2], g3.shape[2]
            if t * t * (d_in + d_out) <= t * d_in * d_out:
                # Ghost norm: ||g^T a||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s), no (d_out, d_in) matrix.
                out += (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum(
                    dim=(1, 2)
                )
            else:
                out += torch.bmm(g3.transpose(1, 2), a3).pow(2).sum(dim=(1, 2))
        if _trainable(module.bias):
            out += g3.sum(dim=1).pow(2).sum(dim=1)
        return out
    if isinstance(module, nn.Embedding):
        ids = a.reshape(a.shape[0], -1)
        g3 = _flat(g)
        if module.padding_idx is not None:
            # The padding row gets no gradient (nn.Embedding's rule).
            g3 = g3 * (ids != module.padding_idx).unsqueeze(-1).to(g3.dtype)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g3.dtype)
        return (same * torch.bmm(g3, g3.transpose(1, 2))).sum(dim=(1, 2))
    assert isinstance(module, nn.LayerNorm)
    gw, gb = _layer_norm_per_example(module, a, g)
    out = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    if gw is not None:
        out += gw.pow(2).flatten(1).sum(dim=1)
    if gb is not None:
        out += gb.pow(2).flatten(1).sum(dim=1)
    return out


def _layer_norm_per_example(
    module: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    shape = tuple(module.normalized_shape)
    reduce = tuple(range(1, a.dim() - len(shape)))
    gw = gb = None
    if _trainable(module.weight):
        xhat = nn.functional.layer_norm(a, shape, eps=module.eps)
        gw = (g * xhat).sum(dim=reduce) if reduce else g * xhat
    if _trainable(module.bias):
        gb = g.sum(dim=reduce) if reduce else g
    return gw, gb


def _accumulate(p: torch.Tensor, grad: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = grad.to(p.dtype)
    else:
        p.grad.add_(grad.to(p.dtype))


def _add_clipped_sum(module: nn.Module, a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> None:
    """Add ``sum_i c_i * grad_i`` of ``module``'s trainable weights to their ``.grad``."""
    if isinstance(module, nn.Linear):
        gc = _flat(g) * c.view(-1, 1, 1)
        if _trainable(module.weight):
            a3 = _flat(a)
            _accumulate(
                module.weight,
                gc.reshape(-1, gc.shape[-1]).t() @ a3.reshape(-1, a3.shape[-1]).to(gc.dtype),
            )
        if _trainable(module.bias):
            assert module.bias is not None
            _accumulate(module.bias, gc.sum(dim=(0, 1)))
        return
    if isinstance(module, nn.Embedding):
        ids = a.reshape(-1)
        gc = (_flat(g) * c.view(-1, 1, 1)).reshape(-1, g.shape[-1])
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            ids, gc = ids[keep], gc[keep]
        grad = torch.zeros_like(module.weight)
        grad.index_add_(0, ids, gc.to(grad.dtype))
        _accumulate(module.weight, grad)
        return
    assert isinstance(module, nn.LayerNorm)
    gw, gb = _layer_norm_per_example(module, a, g)
    if gw is not None:
        _accumulate(module.weight, torch.einsum("b,b...->...", c, gw))
    if gb is not None:
        _accumulate(module.bias, torch.einsum("b,b...->...", c, gb))
