"""The in-process engine's lanes: clients of a round in parallel threads, one base model per lane.

On a CPU the lanes are forced with two CPU "devices" (``engine_lanes`` patched): the numbers must be
those of the clients run one after another, and two clients must really train at the same time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import privet.client.app as client_app
import privet.simulations.run as simulation_run
from privet.common.config import load_config
from privet.common.errors import ConfigError
from privet.common.model_pool import (
    MODELS,
    Placement,
    current_placement,
    generator_lock,
    seeded_generator,
)
from privet.simulations import simulate
from privet.simulations.inprocess import _placements, engine_lanes, lane_devices

from .inprocess_runs import assert_same_run, causal_lm_recipe, run_numbers, small_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("num_gpus", "share", "devices"),
    [
        (0, 1.0, []),  # no GPU: no lanes
        (2, 0.0, []),  # no share asked: one after another
        (1, 1.0, ["cuda:0"]),
        (2, 1.0, ["cuda:0", "cuda:1"]),
        (1, 0.5, ["cuda:0", "cuda:0"]),
        (2, 0.5, ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]),
        (1, 0.25, ["cuda:0"] * 4),
        (3, 1 / 3, ["cuda:0"] * 3 + ["cuda:1"] * 3 + ["cuda:2"] * 3),
        # a client's share never spans two GPUs: 0.75 is one lane per GPU, not two on cuda:0
        (2, 0.75, ["cuda:0", "cuda:1"]),
        (3, 0.3, ["cuda:0"] * 3 + ["cuda:1"] * 3 + ["cuda:2"] * 3),
        (1, 0.6, ["cuda:0"]),
    ],
)
def test_lane_devices(num_gpus: int, share: float, devices: list[str]) -> None:
    assert lane_devices(num_gpus, share) == devices


def test_more_than_one_gpu_per_client_is_refused_in_process() -> None:
    with pytest.raises(ConfigError, match=r"gpus_per_client = 2.*engine = 'ray'"):
        lane_devices(4, 2.0)
    with pytest.raises(ConfigError, match=r"simulation: gpus_per_client = 1.5 with engine"):
        load_config(None, ["simulation.engine='inprocess'", "simulation.gpus_per_client=1.5"])
    # Ray reserves several GPUs per client if asked; in process one GPU per client is the most.
    assert load_config(None, ["simulation.gpus_per_client=2"]).simulation.gpus_per_client == 2
    assert (
        load_config(
            None, ["simulation.engine='inprocess'", "simulation.gpus_per_client=1"]
        ).simulation.engine
        == "inprocess"
    )


def test_placements_number_the_models_of_one_device() -> None:
    lanes = _placements(["cpu", "cpu", "cuda:1", "cpu"])
    assert [(str(p.device), p.replica) for p in lanes] == [
        ("cpu", 0),
        ("cpu", 1),
        ("cuda:1", 0),
        ("cpu", 2),
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_the_engine_runs_clients_one_after_another(tmp_path: Path) -> None:
    for share in ("0", "0.5", "1"):
        cfg = small_config(tmp_path, "x", [f"simulation.gpus_per_client={share}"])
        assert engine_lanes(cfg) is None


def test_seeded_generator_is_one_devices_alone_and_gives_its_state_back() -> None:
    before = torch.get_rng_state()
    with seeded_generator(torch.device("cpu"), 123):
        first = torch.rand(3)
        # another lane on the CPU's generator would wait; one on a CUDA device's would not
        assert not generator_lock("cpu").acquire(blocking=False)
        assert generator_lock("cuda:0").acquire(blocking=False)
        generator_lock("cuda:0").release()
        second = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    assert not generator_lock("cpu").locked()
    expected = torch.Generator().manual_seed(123)
    assert torch.equal(first, torch.rand(3, generator=expected))
    assert torch.equal(second, torch.rand(3, generator=expected))


class _Overlap:
    """Wraps ``train``: the first two clients wait for each other inside it (both lanes at once)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.barrier = threading.Barrier(2, timeout=120)  # a bound for a failure, not a wait
        self.lock = threading.Lock()
        self.calls = 0
        self.inside = 0
        self.most_inside = 0
        self.lanes: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.calls += 1
            first = self.calls <= 2
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            placement = current_placement()
            assert isinstance(placement, Placement)
            self.lanes.add(f"{placement.device}/{placement.replica}")
        try:
            if first:
                self.barrier.wait()
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1


def _lanes(monkeypatch: pytest.MonkeyPatch, devices: list[str] | None) -> None:
    monkeypatch.setattr(simulation_run, "engine_lanes", lambda cfg: devices)


@pytest.mark.parametrize("recipe", ["default", "dropout", "fedex", "causal_lm"])
def test_two_lanes_give_the_numbers_of_one(
    recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """default: DP on, no dropout, the lanes train at once (checked); dropout: each draw comes from
    the CPU's generator, so the lanes take turns and the numbers stay exact; fedex: residuals in
    every lane's base weights; causal_lm: a causal LM
    whose clients also evaluate on the lanes and whose server generates on lane 0's model."""
    extra = {
        "default": [],
        "dropout": ["model.dropout=0.1", "adapter.dropout=0.1"],
        # FedEx-LoRA: residuals folded into every lane's base weights
        "fedex": ["adapter.freeze_a=false", "aggregation.lora='fedex'", "privacy.enabled=false"],
        "causal_lm": causal_lm_recipe(monkeypatch) if recipe == "causal_lm" else [],
    }[recipe]
    _lanes(monkeypatch, None)
    one = simulate(small_config(tmp_path, "one", extra), preflight=False)

    _lanes(monkeypatch, ["cpu", "cpu"])
    MODELS.clear()  # as in a fresh process: every lane builds its model
    builds = MODELS.builds
    overlap = _Overlap(client_app.train)
    if recipe == "default":
        monkeypatch.setattr(client_app, "train", overlap)
    two = simulate(small_config(tmp_path, "two", extra), preflight=False)
    assert MODELS.builds - builds == 2  # lane 0's (the server's too) and lane 1's
    assert_same_run(one, two)
    metrics, _ = run_numbers(two)
    assert all(not m["errors"] for m in metrics)
    if recipe == "default":
        assert overlap.most_inside == 2 and not overlap.barrier.broken
        assert overlap.lanes == {"cpu/0", "cpu/1"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: lanes over GPUs")
def test_gpu_lanes_give_the_numbers_of_one_after_another(tmp_path: Path) -> None:
    """Two lanes per GPU (gpus_per_client = 0.5) against the clients one after another on the GPU.

    Close, not bit-equal: the GPU kernels of equal runs are not promised to sum in one order.
    """
    share = ["simulation.gpus_per_client=0.5"]
    assert engine_lanes(small_config(tmp_path, "x", share)) == lane_devices(
        torch.cuda.device_count(), 0.5
    )
    one = simulate(small_config(tmp_path, "one", []), preflight=False)
    MODELS.clear()  # as in a fresh process: every lane builds its model
    builds = MODELS.builds
    two = simulate(small_config(tmp_path, "two", share), preflight=False)
    assert MODELS.builds - builds == 2 * torch.cuda.device_count()
    metrics_one, adapter_one = run_numbers(one)
    metrics_two, adapter_two = run_numbers(two)
    for a, b in zip(metrics_one, metrics_two, strict=True):
        assert a["clients_trained"] == b["clients_trained"]
        assert a["epsilon_per_client"] == b["epsilon_per_client"]
        for key in ("server_loss", "server_accuracy", "train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
    for key, value in adapter_one.items():
        torch.testing.assert_close(adapter_two[key], value, rtol=1e-4, atol=1e-5)
