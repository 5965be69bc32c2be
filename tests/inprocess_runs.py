"""Small in-process federations and the numbers they write, compared to the last bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from privet.common.config import PrivetConfig, load_config
from privet.common.data import federated as federated_module

from .llm_fixtures import sentiment_federation, tiny_llama_dir

#: Wall-clock figures: the only fields of a metrics line that may differ between equal runs.
TIMES = {"seconds", "startup_seconds"}


def small_config(out: Path, name: str, extra: list[str]) -> PrivetConfig:
    """A federation of 3 clients, 2 rounds, on a one-layer model (seconds on a CPU)."""
    return load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=300",
            "data.num_clients=3",
            "federation.rounds=2",
            "train.batch_size=16",
            "train.num_threads=1",
            "simulation.engine='inprocess'",
            f"simulation.output_dir='{out}'",
            f"simulation.run_name='{name}'",
            *extra,
        ],
    )


def run_numbers(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Every metrics line without its timings, and the final adapter's tensors."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in line.items() if k not in TIMES} for line in lines]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "final_adapter").glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return metrics, tensors


def assert_same_run(a: Path, b: Path) -> None:
    """The two runs wrote the same numbers, to the last bit."""
    metrics_a, adapter_a = run_numbers(a)
    metrics_b, adapter_b = run_numbers(b)
    assert [m["round"] for m in metrics_a] == [0, 1, 2]
    assert metrics_a == metrics_b
    assert set(adapter_a) == set(adapter_b) and adapter_a
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def causal_lm_recipe(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A causal LM (the tiny random Llama) on hand-made chats, as tests/test_llm_federation.py runs it.

    The chats are put in place of the loaded data (the per-process cache), as that module does.
    """
    fed = sentiment_federation()
    monkeypatch.setattr(federated_module, "_cached", lambda key: fed)
    return [
        "model.task='causal_lm'",
        f"model.name='{tiny_llama_dir()}'",
        "model.max_length=48",
        "adapter.top_layers=none",
        "adapter.r=8",
        "data.source='files'",
        "data.train_files=['generation.jsonl']",
        "federation.fraction_evaluate=1.0",
        "train.lr=0.2",
    ]


def simulate_causal_lm(out: Path, name: str, extra: list[str]) -> Path:
    """Run :func:`causal_lm_recipe` in this process with ``extra`` overrides, DP at ε = 8."""
    from privet.simulations import simulate

    patch = pytest.MonkeyPatch()
    try:
        cfg = load_config(
            None,
            [
                *causal_lm_recipe(patch),
                "data.num_clients=3",
                "train.batch_size=16",
                "privacy.target_epsilon=8.0",
                "simulation.engine='inprocess'",
                f"simulation.output_dir='{out}'",
                f"simulation.run_name='{name}'",
                *extra,
            ],
        )
        return simulate(cfg, preflight=False)
    finally:
        patch.undo()
