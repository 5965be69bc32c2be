"""Local training and evaluation: plain functions of (model, data, settings). No ``flwr`` in here.

A partner can call :func:`train` and :func:`evaluate` from their own app; the ClientApp is a thin
adapter around them.  Privacy *accounting* (how much epsilon a round costs, whether the budget
allows it) lives in :mod:`privet.client.privacy`; this module only runs the mechanism it is told to
run: Poisson-sampled batches, per-sample clipping, Gaussian noise (Opacus).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from privet.client.bookkeeping import BookKeepingClipper
from privet.common.config import TrainConfig
from privet.common.data import TokenizedExamples, collate, length_sorted_microbatches
from privet.common.errors import PrivacyError
from privet.common.evaluation import EvalResult, autocast_for, evaluate
from privet.common.modeling import trainable_state
from privet.common.privacy.mechanism import example_sampling

# torch warns once per process that a full backward hook "is firing when gradients are computed
# with respect to module outputs since no inputs require gradients": with frozen embeddings that
# is the expected case for every Opacus-wrapped model, and it reached host applications' stderr
# as if something were wrong.  Filtered by its text, so other warnings still show.
warnings.filterwarnings("ignore", message=r"Full backward hook is firing", category=UserWarning)

__all__ = [
    "DPSettings",
    "EvalResult",
    "TrainResult",
    "add_proximal_gradient",
    "evaluate",
    "plan_steps",
    "train",
]


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD mechanism for one round: what Opacus needs, decided by the privacy layer."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    #: ``flat``: per-sample gradients from Opacus's hooks, clipped and summed. ``ghost``: Opacus's
    #: ghost clipping: per-sample gradient *norms* in a first backward pass, then a second backward
    #: of the loss reweighted by the clipping factors; no per-sample gradient is stored, which is
    #: what makes full fine-tuning affordable. ``bookkeeping``: privet's own one-pass ghost clipping
    #: (``client/bookkeeping.py``), the clipped sum formed from the first pass's activations and
    #: output gradients. All three release the same clipped sum.
    clipping: Literal["flat", "ghost", "bookkeeping"] = "flat"


@dataclass
class TrainResult:
    """What one round of local training produced."""

    state: dict[str, torch.Tensor]
    num_examples: int
    steps: int
    train_loss: float
    examples_seen: int
    seconds: float


def plan_steps(num_examples: int, cfg: TrainConfig) -> tuple[float, int]:
    """Sampling rate and number of optimizer steps for one round of ``cfg.local_epochs``.

    With Poisson sampling at rate ``q = batch_size / n`` a pass over the data takes ``1 / q`` steps
    in expectation; the same step count is used without DP so both modes see as many examples.
    The arithmetic is :func:`~privet.common.privacy.mechanism.example_sampling`'s (the ledger,
    the plan and ``privacy.json`` use the same).
    """
    s = example_sampling(num_examples, batch_size=cfg.batch_size, local_epochs=cfg.local_epochs)
    return s.sample_rate, s.steps


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        # From pageable memory a copy waits for every kernel queued before it (a host sync per
        # micro-batch); from pinned memory it is queued like a kernel, so the CPU collates the
        # next micro-batch while the GPU still works. torch's pinned-memory allocator keeps the
        # buffer until the copy is done.
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    mixed_precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the micro-batch, and the per-example losses (still in the graph)."""
    labels = batch.pop("labels")
    with autocast_for(device, mixed_precision):
        logits = model(**batch).logits
    per_example = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return per_example.mean(), per_example


def _make_optimizer(
    params: Sequence[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _poisson_batches(
    n: int, q: float, steps: int, generator: torch.Generator
) -> Iterator[np.ndarray]:
    # Opacus's sampler: each example joins each batch independently with probability q, which is
    # what the accountant's subsampling analysis assumes.
    sampler = UniformWithReplacementSampler(
        num_samples=n, sample_rate=q, generator=generator, steps=steps
    )
    for idx in sampler:
        yield np.asarray(idx, dtype=np.int64)


def _shuffled_batches(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    # Without DP: fixed-size batches from repeated shuffled passes.
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order = np.concatenate([order[pos:], rng.permutation(n)])
            pos = 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def add_proximal_gradient(
    params: Sequence[torch.nn.Parameter], anchors: Sequence[torch.Tensor], mu: float
) -> None:
    """Add the gradient of FedProx's term ``(mu/2) * ||w - w_global||^2``, ``mu * (w - w_global)``.

    Called on the final (under DP: clipped, noised and averaged) gradient just before the optimizer
    updates the weights. The term depends only on the weights, not on any example, so it is neither
    clipped nor noised: adding it after the DP mechanism is post-processing and costs no privacy.
    Parameters without a gradient get one.
    """
    if mu == 0:
        return
    with torch.no_grad():
        for p, anchor in zip(params, anchors, strict=True):
            prox = mu * (p.detach() - anchor)
            if p.grad is None:
                p.grad = prox.clone()
            else:
                p.grad.add_(prox)


def train(
    model: torch.nn.Module,
    data: TokenizedExamples,
    cfg: TrainConfig,
    *,
    dp: DPSettings | None,
    pad_token_id: int,
    device: torch.device | None = None,
    mixed_precision: str = "auto",
    seed: int | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train the model's trainable weights on ``data`` for one round; return the new weights.

    Parameters
    ----------
    model
        A model whose trainable parameters (``requires_grad``) are the adapter and head.
    data
        The client's tokenized training examples.
    cfg
        Optimizer, learning rate, batch sizes, local epochs.
    dp
        DP-SGD settings (noise, clip, Poisson rate, steps), or ``None`` for non-private training.
    pad_token_id
        The tokenizer's padding id.
    device
        Where to train (default: the model's device).
    mixed_precision
        Autocast on GPU (``auto``/``bf16``/``fp16``/``off``); ignored on CPU.
    seed
        Seed of sampling and noise for this round (default: ``cfg.seed``).
    proximal_mu
        FedProx: add ``(mu/2) * ||w - w_start||^2`` to the loss, where ``w_start`` are the trainable
        weights the round starts from (the global model the server sent); 0 turns it off.
    on_step
        Called as ``on_step(steps_done, steps)`` after each step (progress display); it must be
        quick and must not raise.

    Returns
    -------
    TrainResult
        The trainable weights after the round (CPU tensors) and training metrics.

    """
    start = time.perf_counter()
    n = len(data)
    device = device or next(model.parameters()).device
    model.to(device)
    model.train()
    seed = cfg.seed if seed is None else seed
    params = [p for p in model.parameters() if p.requires_grad]
    if proximal_mu < 0 or not math.isfinite(proximal_mu):
        raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu}")
    # FedProx's anchor: the global weights this round starts from.
    anchors = [p.detach().clone() for p in params] if proximal_mu else []
    optimizer = _make_optimizer(params, cfg)
    # Small micro-batches on CPU: each is padded only to its own longest text.
    physical = cfg.physical_batch_size or (128 if device.type == "cuda" else 16)

    ghost: _GhostClipping | BookKeepingClipper | None = None
    if dp is None:
        _, steps = plan_steps(n, cfg)
        batches: Iterator[np.ndarray] = _shuffled_batches(
            n, min(cfg.batch_size, n), steps, np.random.default_rng(seed)
        )
        net: torch.nn.Module = model
        dp_opt: DPOptimizer | None = None
    else:
        if dp.noise_multiplier <= 0 and not math.isinf(dp.max_grad_norm):
            # Noise 0 is allowed only as an explicit test of the mechanism (clip set to infinity too).
            raise PrivacyError(
                "DP training was asked for with noise_multiplier 0, which gives no privacy",
                fix="disable privacy explicitly (privacy.enabled = false) for a non-private baseline",
            )
        steps = dp.steps
        gen = torch.Generator().manual_seed(seed)
        batches = _poisson_batches(n, dp.sample_rate, steps, gen)
        net, dp_opt = _make_private(model, optimizer, dp, n=n, device=device, seed=seed)
        if isinstance(net, GradSampleModuleFastGradientClipping):
            ghost = _GhostClipping(net)
        elif dp.clipping == "bookkeeping":
            # Our own one-pass clipping (client/bookkeeping.py); noise and accounting stay Opacus's.
            ghost = BookKeepingClipper(net, max_grad_norm=dp_opt.max_grad_norm)

    seen, done = 0, 0
    # The loss is summed on the device: a float() per micro-batch would wait for the GPU to finish
    # every step before the next one is queued (one host sync per micro-batch).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # Seed the global RNG too (dropout, if the model has any) without disturbing the caller's.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            for batch_idx in batches:
                done += 1
                if dp_opt is not None and len(batch_idx) == 0:
                    _noise_only_step(dp_opt, params, anchors, proximal_mu)
                    continue
                micro = length_sorted_microbatches(batch_idx, data.lengths, physical)
                for j, mb in enumerate(micro):
                    batch = _to(collate([data[int(i)] for i in mb], pad_token_id), device)
                    if ghost is not None:
                        ghost.start_microbatch()
                    # No autocast under DP: per-sample norms must be computed in full precision.
                    loss, per_example_graph = _forward_loss(
                        net, batch, device, "off" if dp_opt else mixed_precision
                    )
                    per_example = per_example_graph.detach()
                    if dp_opt is None:
                        # Gradient accumulation: weight each micro-batch by its share of the batch.
                        (loss * (len(mb) / len(batch_idx))).backward()  # type: ignore[no-untyped-call]
                    else:
                        if ghost is not None:
                            ghost.backward(per_example_graph)
                        else:
                            loss.backward()  # type: ignore[no-untyped-call]
                        if j < len(micro) - 1:
                            # Clip and accumulate this micro-batch; noise is added once per batch.
                            dp_opt.signal_skip_step(do_skip=True)
                            dp_opt.step()
                            dp_opt.zero_grad(set_to_none=True)
                    loss_sum += per_example.sum()
                    seen += len(mb)
                if dp_opt is None:
                    add_proximal_gradient(params, anchors, proximal_mu)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    # DPOptimizer.step() written out, so the proximal gradient joins after the noise.
                    if dp_opt.pre_step():
                        add_proximal_gradient(params, anchors, proximal_mu)
                        dp_opt.original_optimizer.step()
                    dp_opt.zero_grad(set_to_none=True)
                if on_step is not None:
                    on_step(done, steps)
        finally:
            if ghost is not None:
                ghost.close()
            release_private(net, params)

    if dp is not None and done != dp.steps:
        raise PrivacyError(f"DP training ran {done} steps, the accountant was told {dp.steps}")
    return TrainResult(
        state=trainable_state(model),
        num_examples=n,
        steps=done,
        train_loss=float(loss_sum) / max(seen, 1),
        examples_seen=seen,
        seconds=time.perf_counter() - start,
    )


def release_private(net: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
    """Undo :func:`_make_private`'s wrapping: no Opacus hooks, no per-sample state on ``params``.

    The caller's model is left as it was given (a cached base model serves the next client).
    """
    if isinstance(net, AbstractGradSampleModule):
        net._close()
    for p in params:
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)


def _make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: DPSettings,
    *,
    n: int,
    device: torch.device,
    seed: int,
) -> tuple[torch.nn.Module, DPOptimizer]:
    """Wrap model and optimizer for DP-SGD with the clipping mode ``dp.clipping`` asks for.

    The pieces are Opacus's own (what ``PrivacyEngine.make_private`` assembles, minus its data
    loader and accountant: privet samples its own Poisson batches and keeps the accountant history
    in the client's ledger across rounds).
    """
    if dp.clipping == "ghost":
        low = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}
        if low:
            # Ghost clipping takes each example's norm in one backward pass and its clipped
            # gradient in a second; through a low-precision base the two passes round apart, so
            # the released gradient is not bounded by the clip the norm promised (fail-closed).
            raise PrivacyError(
                f"privacy.clipping = 'ghost' cannot clip a model with {sorted(map(str, low))} "
                "weights: its two backward passes would round apart",
                fix="use privacy.clipping = 'bookkeeping' or 'flat' (one pass: the clipped "
                "gradients are the ones whose norms were taken), or model.base_dtype = 'float32'",
            )
    clip = dp.max_grad_norm if math.isfinite(dp.max_grad_norm) else 1e30
    expected = max(1, round(dp.sample_rate * n))
    noise_gen = torch.Generator(device=device).manual_seed(seed + 7919)
    kwargs = {
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": clip,
        "expected_batch_size": expected,
        "loss_reduction": "mean",
        "generator": noise_gen,
    }
    if dp.clipping == "bookkeeping":
        # The model stays unwrapped: BookKeepingClipper leaves the clipped sum in p.grad, which is
        # what Opacus's fast-gradient-clipping optimizer expects.
        return model, DPOptimizerFastGradientClipping(optimizer, **kwargs)  # type: ignore[arg-type]
    if dp.clipping == "ghost":
        net: torch.nn.Module = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            max_grad_norm=clip,
            use_ghost_clipping=True,
        )
        return net, DPOptimizerFastGradientClipping(optimizer, **kwargs)  # type: ignore[arg-type]
    # Per-sample gradients through Opacus's hooks; only modules with trainable weights get hooks.
    net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    return net, DPOptimizer(optimizer, **kwargs)  # type: ignore[arg-type]


class _GhostClipping:
    """Opacus's ghost clipping with a cheaper first backward pass.

    Opacus (``DPTensorFastGradientClipping.backward``) runs two full backward passes: the first
    only to let its hooks compute per-sample gradient norms, the second on the loss reweighted by
    the clipping factors, which gives the clipped sum. The first pass also computes every weight
    gradient, only to throw it away. Here the first pass asks autograd for the gradients of the
    trainable modules' *inputs* instead (what the norm hooks need to fire), so the weight-gradient
    products are skipped; this is our own addition, Opacus has no such option. Modules whose
    inputs need no gradient (the lowest trainable layer) are reached through their own weights.
    """

    def __init__(self, net: GradSampleModuleFastGradientClipping) -> None:
        self.net = net
        self.targets: dict[int, torch.Tensor] = {}
        self.handles = []
        for module in net._module.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                self.handles.append(module.register_forward_pre_hook(self._capture(own)))

    def _capture(self, own: list[torch.nn.Parameter]):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[object, ...]) -> None:
            inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            for t in inputs or own:
                self.targets[id(t)] = t

        return hook

    def start_microbatch(self) -> None:
        self.targets.clear()
        # A norm the first pass failed to compute must fail loudly, not reuse the last one.
        for p in self.net.trainable_parameters:
            p._norm_sample = None

    def backward(self, per_example: torch.Tensor) -> None:
        """Clip each example's gradient and leave the clipped sum in ``p.grad``."""
        # Pass 1: per-sample gradient norms, through Opacus's hooks.
        torch.autograd.grad(
            per_example.mean(), list(self.targets.values()), retain_graph=True, allow_unused=True
        )
        coeff = self.net.get_clipping_coef().to(per_example.device)
        # Pass 2: the loss reweighted by the clipping factors gives the clipped sum.
        self.net.disable_hooks()
        try:
            (coeff * per_example).sum().backward()  # type: ignore[no-untyped-call]
        finally:
            self.net.enable_hooks()
        self.targets.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _noise_only_step(
    dp_opt: DPOptimizer,
    params: Sequence[torch.nn.Parameter],
    anchors: Sequence[torch.Tensor],
    proximal_mu: float,
) -> None:
    # An empty Poisson batch still releases a noisy step: skipping it would reveal that the
    # batch was empty, which the privacy analysis does not allow for.
    for p in params:
        p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
    dp_opt.add_noise()
    for p in params:
        # what DPOptimizer.scale_grad does for a mean loss (it cannot count an empty batch)
        p.grad = p.grad / dp_opt.expected_batch_size  # type: ignore[operator]
    add_proximal_gradient(params, anchors, proximal_mu)
    dp_opt.original_optimizer.step()
    dp_opt.zero_grad(set_to_none=True)
