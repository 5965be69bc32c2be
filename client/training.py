"""Local training and evaluation: plain functions of (model, data, settings). No ``flwr`` in here.

A partner can call :func:`train` and :func:`evaluate` from their own app; the ClientApp is a thin
adapter around them. :func:`train` is the same loop for every task (``privet.common.tasks`` batches
the rows and gives each example's loss) and talks to one :class:`Clipper` (no DP, or flat, ghost or
book-keeping clipping), which hides Opacus's wrapping.  Privacy *accounting* (how much epsilon a round costs, whether the budget
allows it) lives in :mod:`privet.client.privacy`; this module only runs the mechanism it is told to
run: Poisson-sampled batches, per-sample clipping, Gaussian noise (Opacus).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from privet.client.bookkeeping import BookKeepingClipper, bookkeeping_supported
from privet.common.config import TrainConfig
from privet.common.data import length_sorted_microbatches
from privet.common.errors import PrivacyError
from privet.common.evaluation import EvalResult, evaluate
from privet.common.model_pool import seeded_generator
from privet.common.modeling import draws_randomness, trainable_state
from privet.common.privacy.mechanism import example_sampling
from privet.common.tasks import Classification, Task, TaskData

# torch warns once per process that a full backward hook "is firing when gradients are computed
# with respect to module outputs since no inputs require gradients": with frozen embeddings that
# is the expected case for every Opacus-wrapped model, and it reached host applications' stderr
# as if something were wrong.  Filtered by its text, so other warnings still show.
warnings.filterwarnings("ignore", message=r"Full backward hook is firing", category=UserWarning)

__all__ = [
    "Clipper",
    "DPSettings",
    "EvalResult",
    "TrainResult",
    "add_proximal_gradient",
    "evaluate",
    "make_clipper",
    "plan_steps",
    "resolve_clipping",
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
    #: output gradients. All three release the same clipped sum. ``auto``: :func:`resolve_clipping`
    #: picks one for the model and device when training starts.
    clipping: Literal["auto", "flat", "ghost", "bookkeeping"] = "flat"


@dataclass
class TrainResult:
    """What one round of local training produced."""

    state: dict[str, torch.Tensor]
    num_examples: int
    steps: int
    train_loss: float
    examples_seen: int
    seconds: float
    #: The clipping that ran (``privacy.clipping = 'auto'`` resolved), ``None`` without DP.
    clipping: str | None = None


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
    data: TaskData,
    cfg: TrainConfig,
    *,
    dp: DPSettings | None,
    pad_token_id: int,
    device: torch.device | None = None,
    mixed_precision: str = "auto",
    seed: int | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, int], None] | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Train the model's trainable weights on ``data`` for one round; return the new weights.

    Parameters
    ----------
    model
        A model whose trainable parameters (``requires_grad``) are the adapter and head.
    data
        The client's tokenized training examples (``task.tokenize``'s result).
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
    task
        How rows are batched and what an example's loss is (``privet.common.tasks``; default:
        classification). The loop itself is the same for every task.

    Returns
    -------
    TrainResult
        The trainable weights after the round (CPU tensors) and training metrics.

    """
    start = time.perf_counter()
    task = task or Classification()
    n = len(data)
    device = device or next(model.parameters()).device
    model.to(device)
    model.train()
    seed = cfg.seed if seed is None else seed
    params = [p for p in model.parameters() if p.requires_grad]
    if proximal_mu < 0 or not math.isfinite(proximal_mu):
        raise ValueError(f"proximal_mu must be a finite number >= 0, got {proximal_mu}")
    # FedProx's anchor: the global weights this round starts from (taken in the training basis).
    anchors: list[torch.Tensor] = []
    optimizer = _make_optimizer(params, cfg)
    # Small micro-batches on CPU: each is padded only to its own longest text.
    physical = cfg.physical_batch_size or (128 if device.type == "cuda" else 16)

    if dp is None:
        _, steps = plan_steps(n, cfg)
        batches: Iterator[np.ndarray] = _shuffled_batches(
            n, min(cfg.batch_size, n), steps, np.random.default_rng(seed)
        )
    else:
        steps = dp.steps
        batches = _poisson_batches(n, dp.sample_rate, steps, torch.Generator().manual_seed(seed))
    clipper = make_clipper(model, optimizer, dp, n=n, device=device, seed=seed)
    # No autocast under DP: per-sample norms must be computed in full precision.
    precision = "off" if dp is not None else mixed_precision

    def prox() -> None:
        add_proximal_gradient(params, anchors, proximal_mu)

    seen, done = 0, 0
    # The loss is summed on the device: a float() per micro-batch would wait for the GPU to finish
    # every step before the next one is queued (one host sync per micro-batch).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # Dropout draws from the device's global generator: seed it for this round, and give the
    # caller's state back after. The in-process engine trains clients in parallel threads that
    # share the process's generators (the CPU's, one per CUDA device), so seeded_generator holds
    # that one generator's lock for the round: the draws of two clients never interleave, and no
    # client re-seeds another's generator mid-round. A model without dropout draws nothing from
    # it; it skips the lock, so that lanes sharing a device train at the same time.
    rng = seeded_generator(device, seed) if draws_randomness(model) else contextlib.nullcontext()
    # The task's training coordinates (a centered readout's basis): the state read below, after
    # the block, is the model's own weights.
    with rng, task.training_basis(model):
        anchors.extend(p.detach().clone() for p in params if proximal_mu)
        try:
            for batch_idx in batches:
                done += 1
                micro = length_sorted_microbatches(batch_idx, data.lengths, physical)
                for j, mb in enumerate(micro):
                    batch = _to(task.collate([data[int(i)] for i in mb], pad_token_id), device)
                    clipper.start_microbatch()
                    per_example = task.per_example_loss(
                        clipper.net, batch, device=device, mixed_precision=precision
                    )
                    clipper.backward(
                        per_example, share=len(mb) / len(batch_idx), last=j == len(micro) - 1
                    )
                    loss_sum += per_example.detach().sum()
                    seen += len(mb)
                clipper.step(prox, empty=len(batch_idx) == 0)
                if on_step is not None:
                    on_step(done, steps)
        finally:
            clipper.close()

    if dp is not None and done != dp.steps:
        raise PrivacyError(f"DP training ran {done} steps, the accountant was told {dp.steps}")
    return TrainResult(
        state=trainable_state(model),
        num_examples=n,
        steps=done,
        train_loss=float(loss_sum) / max(seen, 1),
        examples_seen=seen,
        seconds=time.perf_counter() - start,
        clipping=clipper.clipping,
    )


class Clipper:
    """How a batch's gradient is formed and applied: the one interface the training loop calls.

    Per micro-batch the loop calls :meth:`start_microbatch`, runs the forward pass through
    :attr:`net`, and hands the per-example losses to :meth:`backward`; per batch it calls
    :meth:`step`. This class is the non-private case (the mean loss's gradient, accumulated over
    micro-batches, and an optimizer step); the DP subclasses clip each example's gradient
    (``flat``: Opacus's per-sample gradients; ``ghost``: Opacus's two-pass ghost clipping;
    ``bookkeeping``: privet's one-pass clipping) and add the noise, and hide Opacus's wrapping.
    """

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        #: The module the forward pass runs through (Opacus's wrapper, or the model itself).
        self.net = net
        self.optimizer = optimizer
        #: The clipping this clipper runs (``flat``, ``ghost``, ``bookkeeping``; ``None``: no DP).
        self.clipping: str | None = None

    def start_microbatch(self) -> None:
        """Called before each micro-batch's forward pass."""

    def backward(self, per_example: torch.Tensor, *, share: float, last: bool) -> None:
        """Accumulate the micro-batch's gradient; ``share`` is its fraction of the batch."""
        # Gradient accumulation: weight each micro-batch by its share of the batch.
        (per_example.mean() * share).backward()  # type: ignore[no-untyped-call]

    def step(self, prox: Callable[[], None], *, empty: bool) -> None:
        """Apply the batch's gradient (``prox`` adds FedProx's term to it first)."""
        prox()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Leave the model as it was given (no hooks, no per-sample state)."""


class _DPClipper(Clipper):
    """DP-SGD with Opacus's optimizer: clipped per-example gradients, Gaussian noise per batch."""

    def __init__(
        self, net: torch.nn.Module, dp_opt: DPOptimizer, params: Sequence[torch.nn.Parameter]
    ) -> None:
        super().__init__(net, dp_opt)
        self.dp_opt = dp_opt
        self.params = list(params)

    def backward(self, per_example: torch.Tensor, *, share: float, last: bool) -> None:
        self._clipped_backward(per_example)
        if not last:
            # Clip and accumulate this micro-batch; noise is added once per batch.
            self.dp_opt.signal_skip_step(do_skip=True)
            self.dp_opt.step()
            self.dp_opt.zero_grad(set_to_none=True)

    def _clipped_backward(self, per_example: torch.Tensor) -> None:
        # Opacus's hooks form per-sample gradients of the mean loss; its optimizer clips them.
        per_example.mean().backward()  # type: ignore[no-untyped-call]

    def step(self, prox: Callable[[], None], *, empty: bool) -> None:
        if empty:
            _noise_only_step(self.dp_opt, self.params, prox)
            return
        # DPOptimizer.step() written out, so the proximal gradient joins after the noise.
        if self.dp_opt.pre_step():
            prox()
            self.dp_opt.original_optimizer.step()
        self.dp_opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        release_private(self.net, self.params)


class _HookClipper(_DPClipper):
    """Ghost or book-keeping clipping: the clipped sum is left in ``p.grad`` by a helper."""

    def __init__(
        self,
        net: torch.nn.Module,
        dp_opt: DPOptimizer,
        params: Sequence[torch.nn.Parameter],
        helper: _GhostClipping | BookKeepingClipper,
    ) -> None:
        super().__init__(net, dp_opt, params)
        self.helper = helper

    def start_microbatch(self) -> None:
        self.helper.start_microbatch()

    def _clipped_backward(self, per_example: torch.Tensor) -> None:
        self.helper.backward(per_example)

    def close(self) -> None:
        self.helper.close()
        super().close()


def resolve_clipping(
    clipping: str, *, model: torch.nn.Module, device: torch.device
) -> Literal["flat", "ghost", "bookkeeping"]:
    """The clipping to run for ``privacy.clipping = clipping`` on ``model`` trained on ``device``.

    ``auto`` is book-keeping on a CUDA device when :func:`bookkeeping_supported` says it covers
    every trainable layer (measured fastest there: one backward pass and no per-sample
    gradients, ``docs/benchmarks.md``), else flat; on a CPU always flat, so a CPU run is exactly
    what it was before ``auto`` existed. Every mode releases the same clipped sum: the choice is
    one of speed and memory, never of privacy. Any other value is returned as it is.
    """
    if clipping in ("flat", "ghost", "bookkeeping"):
        return clipping  # type: ignore[return-value]
    if clipping != "auto":
        raise ValueError(f"unknown clipping {clipping!r}")
    if device.type == "cuda" and bookkeeping_supported(model) is None:
        return "bookkeeping"
    return "flat"


def make_clipper(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: DPSettings | None,
    *,
    n: int,
    device: torch.device,
    seed: int,
) -> Clipper:
    """The clipper for ``dp`` (``None``: no DP): ``flat``, ``ghost`` or ``bookkeeping`` clipping.

    ``auto`` is resolved here (:func:`resolve_clipping`); the clipper's ``clipping`` says what ran.

    Raises
    ------
    PrivacyError
        When ``dp`` asks for noise 0 with a finite clip (no privacy), or the clipping mode cannot
        clip this model.

    """
    if dp is None:
        return Clipper(model, optimizer)
    if dp.noise_multiplier <= 0 and not math.isinf(dp.max_grad_norm):
        # Noise 0 is allowed only as an explicit test of the mechanism (clip set to infinity too).
        raise PrivacyError(
            "DP training was asked for with noise_multiplier 0, which gives no privacy",
            fix="disable privacy explicitly (privacy.enabled = false) for a non-private baseline",
        )
    dp = replace(dp, clipping=resolve_clipping(dp.clipping, model=model, device=device))
    clipper = _dp_clipper(model, optimizer, dp, n=n, device=device, seed=seed)
    clipper.clipping = dp.clipping
    return clipper


def _dp_clipper(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: DPSettings,
    *,
    n: int,
    device: torch.device,
    seed: int,
) -> Clipper:
    params = [p for p in model.parameters() if p.requires_grad]
    net, dp_opt = _make_private(model, optimizer, dp, n=n, device=device, seed=seed)
    if isinstance(net, GradSampleModuleFastGradientClipping):
        return _HookClipper(net, dp_opt, params, _GhostClipping(net))
    if dp.clipping == "bookkeeping":
        # Our own one-pass clipping (client/bookkeeping.py); noise and accounting stay Opacus's.
        try:
            helper = BookKeepingClipper(net, max_grad_norm=dp_opt.max_grad_norm)
        except BaseException:
            release_private(net, params)
            raise
        return _HookClipper(net, dp_opt, params, helper)
    return _DPClipper(net, dp_opt, params)


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
    dp_opt: DPOptimizer, params: Sequence[torch.nn.Parameter], prox: Callable[[], None]
) -> None:
    # An empty Poisson batch still releases a noisy step: skipping it would reveal that the
    # batch was empty, which the privacy analysis does not allow for.
    for p in params:
        p.summed_grad = torch.zeros_like(p)  # type: ignore[attr-defined]
    dp_opt.add_noise()
    for p in params:
        # what DPOptimizer.scale_grad does for a mean loss (it cannot count an empty batch)
        p.grad = p.grad / dp_opt.expected_batch_size  # type: ignore[operator]
    prox()
    dp_opt.original_optimizer.step()
    dp_opt.zero_grad(set_to_none=True)
