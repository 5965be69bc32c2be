"""One base model per device in an in-process simulation: the ServerApp evaluates on the clients' model.

The numbers must be those of a run whose server builds a model of its own (what every run did
before the pool), for the default recipe (DP on) and for FedEx-LoRA, whose server folds residuals
into the frozen base weights the clients train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from privet.common import tasks
from privet.common.config import PrivetConfig
from privet.common.data import cached_federated_data
from privet.common.model_pool import MODELS, ModelPool
from privet.server.app import make_server_app
from privet.server.rundir import create_run_dir
from privet.simulations import simulate
from privet.simulations.inprocess import run_in_process
from privet.simulations.run import _client_app, simulated_nodes

from .inprocess_runs import assert_same_run, causal_lm_recipe, run_numbers, small_config

pytestmark = pytest.mark.slow

RECIPES = {
    "default": [],
    # FedEx-LoRA: trainable A, the server folds the accumulated residual into the base weights.
    "fedex": ["adapter.freeze_a=false", "aggregation.lora='fedex'", "privacy.enabled=false"],
}


@pytest.fixture
def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every base model built from now on (the tasks' one call into ``build_model``)."""
    calls: list[int] = []
    real = tasks.build_model

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "build_model", counted)
    return calls


def own_server_model_run(cfg: PrivetConfig) -> Path:
    """The run as before the pool: the ServerApp builds its own model; the clients share one."""
    run_dir = create_run_dir(cfg)
    n = len(cached_federated_data(cfg.data).clients)
    nodes = simulated_nodes(cfg, n)
    server = make_server_app(cfg, run_dir=run_dir, simulated_nodes=nodes)
    client = _client_app(cfg, state_dir=run_dir / "clients", num_clients=n, num_labels=2)
    run_in_process(server, client, num_nodes=nodes)
    return run_dir


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_base_model_and_the_same_numbers(
    recipe: str, tmp_path: Path, count_builds: list[int]
) -> None:
    shared = simulate(small_config(tmp_path, "shared", RECIPES[recipe]), preflight=False)
    assert len(count_builds) == 1  # server and every client on one object

    MODELS.clear()  # the clients' model is built again, as in a fresh process
    run_dir = own_server_model_run(small_config(tmp_path, "own", RECIPES[recipe]))
    assert len(count_builds) == 3  # one for the server, one for the clients
    assert_same_run(shared, run_dir)


def test_a_causal_lm_shares_its_model_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count_builds: list[int]
) -> None:
    """The server also generates its samples on the shared model; clients evaluate on it too."""
    recipe = causal_lm_recipe(monkeypatch)
    shared = simulate(small_config(tmp_path, "shared", recipe), preflight=False)
    assert len(count_builds) == 1
    MODELS.clear()
    own = own_server_model_run(small_config(tmp_path, "own", recipe))
    assert len(count_builds) == 3
    assert_same_run(shared, own)
    assert any(m["server_samples"] for m in run_numbers(shared)[0])


def test_a_second_run_starts_from_the_model_as_built(tmp_path: Path) -> None:
    """The pool keeps the model between runs; the next run's server must not start from its adapter."""
    first = simulate(small_config(tmp_path, "first", []), preflight=False)
    second = simulate(small_config(tmp_path, "second", []), preflight=False)
    assert_same_run(first, second)


def test_pool_hands_out_one_model_per_recipe_device_and_replica(tmp_path: Path) -> None:
    pool = ModelPool()
    cfg = small_config(tmp_path, "pool", [])
    cpu = torch.device("cpu")
    a = pool.get(cfg, num_labels=2, device=cpu)
    assert pool.get(cfg, num_labels=2, device=cpu) is a
    b = pool.get(cfg, num_labels=2, device=cpu, replica=1)
    assert b is not a and b.fingerprint == a.fingerprint
    assert pool.builds == 2
    # fresh (a server starting a run): the model was handed out, so it is built again
    c = pool.get(cfg, num_labels=2, device=cpu, fresh=True)
    assert c is not a and pool.get(cfg, num_labels=2, device=cpu) is c
    assert pool.builds == 3
    # another recipe drops the models of the old one
    other = small_config(tmp_path, "pool", ["adapter.r=2"])
    d = pool.get(other, num_labels=2, device=cpu)
    assert pool.builds == 4
    assert pool.get(cfg, num_labels=2, device=cpu) is not c
    assert pool.builds == 5 and d is not c
