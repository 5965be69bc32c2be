"""The updates a site released, kept so that a redone round costs no privacy.

A coordinator that crashes after a site released its update for a round, but before the round's
checkpoint, asks for that round again after ``--resume``. Training again would draw new noise: a
second release, charged again in the site's ledger. Sending the update it already released instead
costs nothing (the same output released twice tells no more than once), so a deployed site keeps
its last released updates on disk, each under the fingerprint of everything it was trained from
(the coordinator's run and round, the incoming weights and config, the site's configuration and
data). Asked again with the same fingerprint, and only when the ledger holds the charge of that
release, the site sends the kept update again without charging; any other input is a new release.

Writes are atomic (a temporary file renamed into place) and only the latest :data:`KEEP` updates
per client stay: a resume redoes the round in flight, never an older one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from privet.common.data import Examples, GenerationExamples

__all__ = ["KEEP", "Release", "load_release", "release_fingerprint", "save_release"]

#: Released updates kept per client (the round in flight, and one before it for safety).
KEEP = 2


@dataclass
class Release:
    """A kept update: the trainable state sent and the metrics that went with it."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, Any]


def release_fingerprint(
    *,
    run: str | None,
    server_round: int,
    content: Any,
    config_json: str,
    client_id: str,
    data: Examples | GenerationExamples,
) -> str:
    """sha256 over everything the update of a round is computed from (hex).

    ``content`` is the train message's ``RecordDict``: every array record (names, dtypes, shapes
    and bytes) and every config record (sorted items) it holds.
    """
    h = hashlib.sha256()

    def put(part: object) -> None:
        raw = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)

    put((run, server_round, client_id, config_json))
    for name in sorted(content.array_records):
        record = content.array_records[name]
        put(("arrays", name))
        for key in sorted(record):
            arr = record[key]
            put((key, arr.dtype, tuple(arr.shape), arr.stype))
            put(bytes(arr.data))
    for name in sorted(content.config_records):
        record = content.config_records[name]
        put(("config", name, sorted((k, repr(v)) for k, v in record.items())))
    put(len(data))
    if isinstance(data, GenerationExamples):
        # A causal LM's example is its prompt turns and its target.
        for prompt, target in zip(data.prompts, data.targets, strict=True):
            put((prompt, target))
    else:
        for text in data.texts:
            put(text)
        put(data.labels.tobytes())
    return h.hexdigest()


def _folder(state_dir: Path, client_id: str) -> Path:
    return Path(state_dir) / "releases" / client_id


def _write_atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_release(
    state_dir: Path,
    client_id: str,
    fingerprint: str,
    *,
    state: dict[str, torch.Tensor],
    metrics: dict[str, Any],
) -> None:
    """Keep a released update (atomically), then drop all but the latest :data:`KEEP`.

    The metrics file is written last: a release counts as kept only when both files exist.
    """
    folder = _folder(state_dir, client_id)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    _write_atomic(folder / f"{fingerprint}.safetensors", lambda p: save_file(tensors, p))
    text = json.dumps(metrics)
    _write_atomic(folder / f"{fingerprint}.json", lambda p: Path(p).write_text(text, "utf-8"))
    kept = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for old in kept[KEEP:]:
        for path in (old, old.with_suffix(".safetensors")):
            with contextlib.suppress(OSError):
                path.unlink()


def load_release(state_dir: Path, client_id: str, fingerprint: str) -> Release | None:
    """The kept update with this fingerprint, or ``None`` (not kept, or unreadable)."""
    folder = _folder(state_dir, client_id)
    meta, weights = folder / f"{fingerprint}.json", folder / f"{fingerprint}.safetensors"
    try:
        metrics = json.loads(meta.read_text(encoding="utf-8"))
        state = load_file(str(weights))
    except (OSError, ValueError, RuntimeError):
        # Not kept, or damaged: the round is trained (and charged) again, never guessed.
        return None
    if not isinstance(metrics, dict):
        return None
    return Release(state=state, metrics=metrics)
