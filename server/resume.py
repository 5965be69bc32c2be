"""What a resumed coordinator needs besides the global adapter: server-optimizer state and RNG streams.

Flower's strategies keep state between rounds in plain attributes and have no save/load of their
own, and ``Strategy.start`` always begins at round 1. So with every round's checkpoint privet
writes ``checkpoints/round-NNNN.server.safetensors`` (atomically, before the adapter checkpoint,
so a round whose adapter is on disk also has this file):

* the attributes of Flower 1.41's stateful strategies, read and written in one place
  (:func:`_stateful_fields`): FedAdam/FedYogi/FedAdagrad (Flower's ``FedOpt``: ``m_t``, ``v_t``,
  ``current_arrays``), FedAvgM (``momentum_vector``, ``current_arrays``), the adaptive clip of
  Flower's adaptive-clipping DP wrappers (``clipping_norm``) and the per-round report of
  :class:`~privet.server.privacy.ClientLevelDP` (its ledger is a file of its own already);
* Python's global ``random`` state, which Flower's ``sample_nodes`` draws the clients of each round
  from, and torch's CPU generator.

NumPy's global generator is deliberately *not* restored: on the server its only consumer is the
Gaussian noise of Flower's client-level DP wrappers. A round redone after a crash would then draw
the very same noise over a different sum of updates, and two releases with one noise reveal the
difference of the sums; the accountant charges the redone round as a fresh, independent one, which
needs fresh noise. A resumed process starts NumPy from fresh OS entropy instead.

A strategy class not known here cannot be resumed faithfully, so ``--resume`` refuses it
(fail-closed) rather than continuing with silently reset state.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from safetensors import safe_open
from safetensors.numpy import save_file

from privet.common.errors import DeploymentError
from privet.server.flower_door import flower_state_fields
from privet.server.lora import FedExLoraAggregation, LoraSvdAggregation
from privet.server.privacy import ClientLevelDP, FederationRound, _FixedDenominatorMean
from privet.server.recording import RecordingStrategy

__all__ = ["restore_server_state", "save_server_state", "server_state_path"]

log = logging.getLogger("privet")

FORMAT = "privet-server-state/1"

#: Strategies (exact types) that carry nothing from one round to the next: what they remember
#: (the arrays sent, the round's record) is set again by ``configure_train``.
_STATELESS: tuple[type, ...] = (
    FedAvg,
    FedProx,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyClientSideFixedClipping,
    RecordingStrategy,
    LoraSvdAggregation,
    # FedEx-LoRA's accumulated residuals travel in the global state (the adapter checkpoint) and
    # are read back from it by every configure_train, so the wrapper itself keeps nothing.
    FedExLoraAggregation,
    _FixedDenominatorMean,
)

#: Attributes through which privet's and Flower's wrappers hold the strategy they wrap. A wrapper
#: may hold one strategy under two names (``ClientLevelDP.dp`` is also its ``inner``); the first
#: name found is the path saved state is stored under, so ``inner`` comes last and paths written
#: before ``WrappedStrategy`` existed still match.
_WRAPPED = ("dp", "strategy", "_mean", "base", "inner")


def _stateful_fields(node: Strategy) -> tuple[str, ...] | None:
    """The attributes of ``node`` that carry state across rounds; ``None`` for an unknown class.

    Flower 1.41's attribute names are known behind the door (``server/flower_door.py``).
    """
    flower = flower_state_fields(node)
    if flower is not None:
        return flower
    if isinstance(node, ClientLevelDP):
        return ("rounds",)
    if type(node) in _STATELESS:
        return ()
    return None


def _walk(strategy: Strategy) -> Iterator[tuple[str, Strategy]]:
    """Every strategy in the wrapper chain with its attribute path (``""``, ``"inner"``, ...)."""
    todo: list[tuple[str, Strategy]] = [("", strategy)]
    seen: set[int] = set()
    while todo and len(seen) < 64:  # bounded: wrappers nest a few levels deep
        path, node = todo.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield path, node
        for attr in _WRAPPED:
            child = getattr(node, attr, None)
            if isinstance(child, Strategy):
                todo.append((f"{path}.{attr}" if path else attr, child))


def server_state_path(run_dir: Path, server_round: int) -> Path:
    """Where :func:`save_server_state` puts the state after ``server_round``."""
    return Path(run_dir) / "checkpoints" / f"round-{server_round:04d}.server.safetensors"


def _encode(
    value: Any, prefix: str, tensors: dict[str, np.ndarray]
) -> dict[str, Any]:  # why: one small codec for the few value kinds Flower's strategies hold
    if value is None:
        return {"kind": "none"}
    if isinstance(value, ArrayRecord):
        keys = list(value.keys())
        for k in keys:
            tensors[f"{prefix}/{k}"] = np.ascontiguousarray(value[k].numpy())
        return {"kind": "arrayrecord", "keys": keys}
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        keys = list(value.keys())
        for k in keys:
            tensors[f"{prefix}/{k}"] = np.ascontiguousarray(value[k])
        return {"kind": "dict", "keys": keys}
    if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value) and value:
        for i, v in enumerate(value):
            tensors[f"{prefix}/{i}"] = np.ascontiguousarray(v)
        return {"kind": "list", "n": len(value)}
    if isinstance(value, list) and all(isinstance(v, FederationRound) for v in value):
        return {"kind": "federation_rounds", "value": [r.as_json() for r in value]}
    if isinstance(value, int | float):
        return {"kind": "number", "value": float(value)}
    raise TypeError(f"cannot save a {type(value).__name__} ({prefix})")


def _decode(spec: dict[str, Any], prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    kind = spec["kind"]
    if kind == "none":
        return None
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(tensors[f"{prefix}/{k}"]) for k in spec["keys"]})
    if kind == "dict":
        return {k: tensors[f"{prefix}/{k}"] for k in spec["keys"]}
    if kind == "list":
        return [tensors[f"{prefix}/{i}"] for i in range(int(spec["n"]))]
    if kind == "federation_rounds":
        return [FederationRound(**r) for r in spec["value"]]
    if kind == "number":
        return float(spec["value"])
    raise ValueError(f"unknown saved value kind {kind!r}")


def save_server_state(run_dir: Path, server_round: int, strategy: Strategy) -> Path:
    """Save ``strategy``'s cross-round state and the server's RNG streams after ``server_round``.

    Parameters
    ----------
    run_dir
        The run directory (``checkpoints/`` must exist).
    server_round
        The round just completed.
    strategy
        The outermost strategy of the run; its whole wrapper chain is saved.

    Returns
    -------
    Path
        The file written (atomically: a temporary file renamed over it).

    """
    tensors: dict[str, np.ndarray] = {}
    nodes: list[dict[str, Any]] = []
    for path, node in _walk(strategy):
        fields = _stateful_fields(node)
        entry: dict[str, Any] = {"path": path, "class": type(node).__name__}
        if fields is None:
            entry["unknown"] = True
        else:
            entry["fields"] = {
                name: _encode(getattr(node, name), f"{path}:{name}", tensors) for name in fields
            }
        nodes.append(entry)
    tensors["rng/torch"] = torch.get_rng_state().numpy()
    out = server_state_path(run_dir, server_round)
    tmp = out.with_name(out.name + ".tmp")
    save_file(
        tensors,
        str(tmp),
        metadata={
            "format": FORMAT,
            "round": str(server_round),
            "nodes": json.dumps(nodes),
            "python_random": json.dumps(random.getstate()),
        },
    )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def restore_server_state(run_dir: Path, server_round: int, strategy: Strategy) -> None:
    """Put the state saved after ``server_round`` back into a freshly built ``strategy``.

    Also restores Python's ``random`` (Flower's client sampling) and torch's CPU generator, so
    the resumed run samples the clients an uninterrupted run would have sampled.

    Raises
    ------
    DeploymentError
        When the state cannot be restored faithfully: a strategy class privet does not know, a
        missing or unreadable state file for a strategy that has state, or a saved chain that does
        not match the configured one. Resuming anyway would continue with reset optimizer state.

    """
    chain = list(_walk(strategy))
    unknown = [type(n).__name__ for _, n in chain if _stateful_fields(n) is None]
    if unknown:
        raise DeploymentError(
            f"cannot resume: privet does not know how to restore the state of the strategy "
            f"{unknown[0]} between rounds",
            fix="start a new run (privet server --config ...) instead of --resume",
        )
    stateful = [type(n).__name__ for _, n in chain if _stateful_fields(n)]
    path = server_state_path(run_dir, server_round)
    if not path.exists():
        if stateful:
            raise DeploymentError(
                f"cannot resume: {path} is missing, so the state of {stateful[0]} after round "
                f"{server_round} (server optimizer moments, momentum or adaptive clip) is lost",
                fix="start a new run; runs written by privet before server-state checkpoints "
                "can only be resumed with a stateless strategy such as fedavg",
            )
        log.warning(
            "no saved server state for round %d (%s): the clients sampled from now on differ "
            "from an uninterrupted run",
            server_round,
            path.name,
        )
        return
    try:
        with safe_open(str(path), framework="np") as fh:  # type: ignore[no-untyped-call]
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        saved = json.loads(meta["nodes"])
        rng = json.loads(meta["python_random"])
    except (OSError, ValueError, KeyError) as exc:
        raise DeploymentError(
            f"cannot resume: the server state {path} is unreadable ({exc})",
            fix="start a new run, or restore the file from a backup",
        ) from None
    layout = [(p, type(n).__name__) for p, n in chain]
    if [(e["path"], e["class"]) for e in saved] != layout:
        raise DeploymentError(
            f"cannot resume: {path.name} holds the state of "
            f"{[e['class'] for e in saved]}, the run's configuration builds {[c for _, c in layout]}",
            fix="resume with the run's own config.toml (do not edit it between runs)",
        )
    for (node_path, node), entry in zip(chain, saved, strict=True):
        for name, spec in entry.get("fields", {}).items():
            setattr(node, name, _decode(spec, f"{node_path}:{name}", tensors))
    random.setstate((rng[0], tuple(rng[1]), rng[2]))
    torch.set_rng_state(torch.from_numpy(tensors["rng/torch"].copy()))
    log.info("restored the server state after round %d (%s)", server_round, path.name)
