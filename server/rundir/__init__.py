"""The run directory: resolved config, one metrics line per round, adapter checkpoints, final adapter.

Layout::

    RUN_DIR/config.toml            the configuration as resolved (defaults filled in)
    RUN_DIR/metrics.jsonl          one JSON object per round (round 0: the untrained model)
    RUN_DIR/checkpoints/round-NNNN.safetensors   the global trainable weights after each round
    RUN_DIR/checkpoints/round-NNNN.server.safetensors   server optimizer state and RNG streams
                                   after each round (``server/resume.py``), for ``--resume``
    RUN_DIR/final_adapter/         PEFT ``save_pretrained`` folder of the final global adapter
    RUN_DIR/summary.json           final metrics
    RUN_DIR/labels.json            the number of classes and their names in label order
    RUN_DIR/clients/               clients' privacy ledgers (simulation default)
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privet.common.config import PrivetConfig, dump_config
from privet.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "LABELS_FILE",
    "append_metrics",
    "check_output_dir",
    "checkpoint_path",
    "create_run_dir",
    "load_checkpoint",
    "read_metrics",
    "read_rounds",
    "resume_point",
    "save_checkpoint",
    "write_json",
]


#: The run directory's record of the label mapping: ``{"num_labels": N, "label_names": [...]}``
#: (names empty when the data has integer labels only).
LABELS_FILE = "labels.json"


def check_output_dir(output_dir: Path) -> None:
    """Refuse an ``simulation.output_dir`` that names a file or a folder privet cannot write.

    Raises
    ------
    ConfigError
        With the path and the fix, before any work starts.

    """
    path = Path(output_dir)
    fix = "set simulation.output_dir to a folder you can write (e.g. --set simulation.output_dir='runs')"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"simulation.output_dir = '{path}' is a file, not a folder.", fix=fix)
    # The nearest folder that exists is the one that must be writable (it gets the new ones).
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"simulation.output_dir = '{path}' lies under '{probe}', which is a file.", fix=fix
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"simulation.output_dir = '{path}': privet may not write in '{probe}'.", fix=fix
        )


def create_run_dir(cfg: PrivetConfig) -> Path:
    """Make a fresh run directory under ``simulation.output_dir`` and write ``config.toml`` in it.

    Raises
    ------
    ConfigError
        When ``simulation.output_dir`` cannot hold run directories, or the named run exists.

    """
    check_output_dir(cfg.simulation.output_dir)
    name = cfg.simulation.run_name or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S-%f")
    run_dir = Path(cfg.simulation.output_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory '{run_dir}' exists and is not empty.",
            fix="choose another simulation.run_name (or leave it out for a dated name)",
        )
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_config(cfg), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot create the run directory '{run_dir}': {exc.strerror or exc}.",
            fix="set simulation.output_dir to a folder you can write",
        ) from None
    return run_dir


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one round's metrics as a JSON line (flushed to disk before returning)."""
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` back."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def read_rounds(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The per-round records of ``metrics.jsonl`` and why the run stopped early (``None``: it did not).

    A run the federation's budget stopped ends with one marker line ``{"round": n, "stopped": why}``.
    Only a line whose ``stopped`` holds a reason is that marker: run directories written before
    the field left the round records carry ``"stopped": null`` on every round, and those are rounds.
    """
    rounds: list[dict[str, Any]] = []
    stopped: str | None = None
    for record in read_metrics(run_dir):
        if record.get("stopped"):
            stopped = str(record["stopped"])
        else:
            rounds.append(record)
    return rounds, stopped


def save_checkpoint(run_dir: Path, server_round: int, state: dict[str, torch.Tensor]) -> Path:
    """Save the global trainable weights after ``server_round`` (safetensors, atomic)."""
    path = run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    from safetensors.torch import save_file  # torch loads here, not for `privet runs`

    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp),
        metadata={"round": str(server_round)},
    )
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    return load_file(str(path))


def resume_point(run_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    """The last round a crashed run completed, and the metrics lines up to it.

    A round is complete when both its checkpoint and its ``metrics.jsonl`` line are on disk (the
    checkpoint is written first, so a crash between the two redoes that round). Lines of later
    rounds, and any repeated line, are dropped from ``metrics.jsonl`` so every round appears once.
    """
    run_dir = Path(run_dir)
    by_round: dict[int, dict[str, Any]] = {}
    for rec in read_metrics(run_dir):
        by_round.setdefault(int(rec["round"]), rec)
    done = 0
    while (done + 1) in by_round and checkpoint_path(run_dir, done + 1).exists():
        done += 1
    # Nothing completed: start over, round 0 included (it is evaluated again).
    kept = [by_round[r] for r in sorted(by_round) if r <= done] if done > 0 else []
    _atomic_write(
        run_dir / "metrics.jsonl",
        "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in kept).encode(),
    )
    return done, kept


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """Where :func:`save_checkpoint` puts the weights after ``server_round``."""
    return Path(run_dir) / "checkpoints" / f"round-{server_round:04d}.safetensors"
