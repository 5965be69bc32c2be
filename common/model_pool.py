"""One process's base models, shared by everything in it that holds the same model, and what lanes share.

A base model is the largest thing a participant holds; in one process the ClientApp (every virtual
client it plays) and, in the in-process engine, the ServerApp's evaluation can use the same object,
because each of them loads the global adapter (and FedEx-LoRA's residuals) into it before it uses
it. :class:`ModelPool` keeps one model per build recipe, device and replica; :data:`MODELS` is the
process's pool. The ServerApp asks for it only when the in-process engine hands the pool over
(``make_server_app(models=...)``): under Ray and in deployment server and clients live in different
processes and keep their own.

The in-process engine can run clients in threads ("lanes", one per device or device share). A lane
says where its client runs with :func:`placed` (a thread-local :class:`Placement`); a client asks
:func:`current_placement`. Lanes share the process's random generators (one for the CPU, one per
CUDA device): :func:`seeded_generator` seeds a device's generator for one client's round and holds
that generator's lock meanwhile, so that two lanes never draw from, or re-seed, one generator at
once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from privet.common.config import PrivetConfig
from privet.common.modeling import BuiltModel, frozen_fingerprint
from privet.common.tasks import task_for

__all__ = [
    "MODELS",
    "ModelPool",
    "Placement",
    "PooledModel",
    "current_placement",
    "generator_lock",
    "model_key",
    "normal_device",
    "placed",
    "seeded_generator",
]


def normal_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device (``cuda:0`` unless set)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# -- random generators ------------------------------------------------------------------------

_generator_locks: dict[str, threading.Lock] = {}
_generator_locks_guard = threading.Lock()


def generator_lock(device: torch.device | str) -> threading.Lock:
    """The lock of the default random generator ``device`` draws from (the CPU's, or one CUDA device's)."""
    key = str(normal_device(device))
    with _generator_locks_guard:
        return _generator_locks.setdefault(key, threading.Lock())


@contextlib.contextmanager
def seeded_generator(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block with ``device``'s default generator seeded with ``seed``, alone; restore it after.

    Only that one generator: ``torch.manual_seed`` would also re-seed every CUDA device's, which
    other lanes may be drawing from. The lock keeps a second lane on the same generator waiting
    until this block is done, so each client's draws (dropout) are what they are when clients run
    one after another.
    """
    device = normal_device(device)
    with generator_lock(device):
        if device.type == "cuda":
            state = torch.cuda.get_rng_state(device)
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
            try:
                yield
            finally:
                torch.cuda.set_rng_state(state, device)
        else:
            state = torch.get_rng_state()
            torch.default_generator.manual_seed(seed)
            try:
                yield
            finally:
                torch.set_rng_state(state)


# -- where a lane's client runs ---------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a client runs: ``device``, on the ``replica``-th base model of that device."""

    device: torch.device
    replica: int = 0


_placement = threading.local()


@contextlib.contextmanager
def placed(placement: Placement) -> Iterator[None]:
    """Run the block (a lane's clients) at ``placement``; this thread only."""
    before = getattr(_placement, "value", None)
    _placement.value = placement
    try:
        yield
    finally:
        _placement.value = before


def current_placement() -> Placement | None:
    """The placement of the calling thread (a lane of the in-process engine), else ``None``."""
    value = getattr(_placement, "value", None)
    return value if isinstance(value, Placement) else None


# -- the pool ---------------------------------------------------------------------------------


def model_key(cfg: PrivetConfig, num_labels: int) -> str:
    """What a base model is built from: the same key, the same weights (``build_model`` is seeded)."""
    recipe = cfg.model_dump_json(include={"model", "adapter"})
    return f"{recipe}|labels={num_labels}|seed={cfg.train.seed}"


@dataclass
class PooledModel:
    """A built model on its device, with the fingerprint of its frozen weights as built."""

    built: BuiltModel
    device: torch.device
    fingerprint: str


class ModelPool:
    """Base models by (recipe, device, replica); one recipe at a time (one federation per process).

    Thread-safe. A model is built on first request; a request for another recipe drops the models
    of the old one first (their memory is freed before the new one is built).
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, int], PooledModel] = {}
        self._handed: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()
        #: Models built so far (tests count them).
        self.builds = 0

    def get(
        self,
        cfg: PrivetConfig,
        *,
        num_labels: int,
        device: torch.device,
        replica: int = 0,
        fresh: bool = False,
    ) -> PooledModel:
        """The model ``cfg`` builds, on ``device``; built now if the pool has none.

        ``fresh`` (the ServerApp, at the start of a run): a model as built, never handed out
        before. A model someone used holds their adapter; the server's initial global state must
        be the built one, so such a model is built again (the clients that come next get the new
        one, and load the adapter from each message as always).
        """
        device = normal_device(device)
        key = (model_key(cfg, num_labels), str(device), replica)
        with self._lock:
            if any(k[0] != key[0] for k in self._models):
                self._models.clear()
                self._handed.clear()
            model = self._models.get(key)
            if model is None or (fresh and key in self._handed):
                self._models.pop(key, None)
                model = self._build(cfg, num_labels=num_labels, device=device)
                self._models[key] = model
                self._handed.discard(key)
            self._handed.add(key)
            return model

    def _build(self, cfg: PrivetConfig, *, num_labels: int, device: torch.device) -> PooledModel:
        # build_model seeds the CPU generator for the new weights: a lane training on the CPU
        # must not draw from it (dropout) meanwhile.
        with generator_lock("cpu"):
            built = task_for(cfg.model).build_model(
                cfg.model, cfg.adapter, num_labels=num_labels, seed=cfg.train.seed
            )
        built.model.to(device)
        self.builds += 1
        return PooledModel(built=built, device=device, fingerprint=frozen_fingerprint(built.model))

    def clear(self) -> None:
        """Drop every model (their memory is freed once nobody else holds them)."""
        with self._lock:
            self._models.clear()
            self._handed.clear()


#: The process's pool: the ClientApp's models, and the in-process ServerApp's.
MODELS = ModelPool()
