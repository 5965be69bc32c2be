"""Hand-made run directories: the files a finished run leaves, with numbers chosen by hand.

A real simulation takes tens of seconds; report, runs, export and tracking only read these files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from privet.common.config import PrivetConfig, dump_config, load_config
from privet.common.modeling import MaskedMeanPooler, build_model

# Three rounds of two clients; every number is chosen so a test can look for it.
RECORDS: list[dict[str, Any]] = [
    {
        "round": 0,
        "clients_trained": [],
        "train_loss": None,
        "train_loss_per_client": {},
        "epsilon_per_client": {},
        "max_epsilon": None,
        "accuracy_per_client": {},
        "client_accuracy": None,
        "server_accuracy": 0.5,
        "server_loss": 0.75,
        "errors": {},
        "rejected": {},
        "bytes_sent": 0,
        "bytes_received": 0,
        "seconds": 0.0,
    },
    {
        "round": 1,
        "clients_trained": ["client-0", "client-1"],
        "train_loss": 0.625,
        "train_loss_per_client": {"client-0": 0.5, "client-1": 0.75},
        "epsilon_per_client": {"client-0": 1.25, "client-1": 1.5},
        "max_epsilon": 1.5,
        "accuracy_per_client": {"client-0": 0.625, "client-1": 0.5},
        "client_accuracy": 0.5625,
        "server_accuracy": 0.625,
        "server_loss": 0.5,
        "errors": {},
        "rejected": {},
        "bytes_sent": 2048,
        "bytes_received": 1024,
        "seconds": 3.5,
    },
    {
        "round": 2,
        "clients_trained": ["client-0", "client-1"],
        "train_loss": 0.375,
        "train_loss_per_client": {"client-0": 0.25, "client-1": 0.5},
        "epsilon_per_client": {"client-0": 2.25, "client-1": 2.75},
        "max_epsilon": 2.75,
        "accuracy_per_client": {"client-0": 0.875, "client-1": 0.75},
        "client_accuracy": 0.8125,
        "server_accuracy": 0.875,
        "server_loss": 0.25,
        "errors": {"node-7": "privacy budget exhausted"},
        "rejected": {},
        "bytes_sent": 4096,
        "bytes_received": 3072,
        "seconds": 4.5,
    },
]

TINY = [
    "model.num_hidden_layers=1",
    "model.max_length=32",
    "data.num_clients=2",
    "federation.rounds=2",
]


def tiny_config(out: Path, name: str, extra: list[str] | None = None) -> PrivetConfig:
    return load_config(
        None,
        [*TINY, f"simulation.output_dir='{out}'", f"simulation.run_name='{name}'", *(extra or [])],
    )


def make_run(
    out: Path,
    name: str = "hand",
    *,
    extra: list[str] | None = None,
    records: list[dict[str, Any]] | None = None,
    finished: bool = True,
    adapter: bool = True,
    seed: int = 3,
) -> tuple[Path, torch.nn.Module | None]:
    """Write a run directory; with ``finished`` also a summary and a final adapter.

    With ``adapter`` the final adapter holds real weights, not the init, and the trained model is
    returned as privet holds it (eval mode); without, only ``final_adapter/privet.json`` is written
    (fast: no model is built) and the model is ``None``.
    """
    cfg = tiny_config(out, name, extra)
    run_dir = out / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_config(cfg), encoding="utf-8")
    recs = RECORDS if records is None else records
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs), encoding="utf-8"
    )
    if not finished:
        return run_dir, None
    _write_summary(run_dir, recs)
    if not adapter:
        (run_dir / "final_adapter").mkdir()
        (run_dir / "final_adapter" / "privet.json").write_text("{}")
        return run_dir, None
    model = build_model(cfg.model, cfg.adapter, num_labels=2, seed=cfg.train.seed).model
    # "Training": every trainable weight moves, so an export that drops the adapter or the head
    # gives different logits.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(run_dir / "final_adapter"))  # type: ignore[operator]
    (run_dir / "final_adapter" / "privet.json").write_text(
        json.dumps(
            {
                "base_model": cfg.model.name,
                "num_hidden_layers": cfg.model.num_hidden_layers,
                "mean_pooling": any(isinstance(m, MaskedMeanPooler) for m in model.modules()),
                "max_length": cfg.model.max_length,
            }
        )
    )
    return run_dir, model.eval()


def _write_summary(run_dir: Path, recs: list[dict[str, Any]]) -> None:
    last = recs[-1]
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "rounds": len(recs) - 1,
                "initial_server_accuracy": recs[0]["server_accuracy"],
                "final_server_accuracy": last["server_accuracy"],
                "final_client_accuracy": last["client_accuracy"],
                "max_epsilon": max(
                    (r["max_epsilon"] for r in recs if r["max_epsilon"] is not None), default=None
                ),
                "errors": {},
                "seconds": sum(r["seconds"] for r in recs),
            }
        )
    )
