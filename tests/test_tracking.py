"""Tracking: TensorBoard events and MLflow runs hold exactly the numbers of each round."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from privet.common.config import load_config
from privet.common.errors import ConfigError
from privet.server.recording import RoundRecord
from privet.server.tracking import Tracking, check_tracking, with_tracking

from .rundirs import RECORDS


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def run_started(self, *, rounds: int, clients: int, run_dir: Path) -> None:
        self.events.append(("start", rounds))

    def round_started(self, server_round: int) -> None:
        self.events.append(("round", server_round))

    def round_finished(self, record: RoundRecord) -> None:
        self.events.append(("done", record.round))


def _drive(observer, run_dir: Path, final_adapter: Path | None = None) -> None:
    observer.run_started(rounds=2, clients=2, run_dir=run_dir)
    for rec in RECORDS:
        if rec["round"]:
            observer.round_started(rec["round"])
        observer.round_finished(RoundRecord(**rec))
    assert isinstance(observer, Tracking)
    observer.close(final_adapter=final_adapter)


def test_no_tracking_leaves_the_observer_alone(tmp_path: Path) -> None:
    rec = Recorder()
    assert with_tracking(load_config(), run_dir=tmp_path, observer=rec) is rec
    assert with_tracking(load_config(), run_dir=tmp_path, observer=None) is None


def test_tensorboard_events_hold_each_rounds_numbers(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["tracking.tensorboard=true"])
    console = Recorder()
    observer = with_tracking(cfg, run_dir=tmp_path, observer=console)
    _drive(observer, tmp_path)
    # the console observer still sees every event, in order
    assert console.events == [
        ("start", 2),
        ("done", 0),
        ("round", 1),
        ("done", 1),
        ("round", 2),
        ("done", 2),
    ]

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("accuracy/server") == [(0, 0.5), (1, 0.625), (2, 0.875)]
    assert series("accuracy/clients") == [(1, 0.5625), (2, 0.8125)]
    assert series("loss/train") == [(1, 0.625), (2, 0.375)]
    assert series("loss/server") == [(0, 0.75), (1, 0.5), (2, 0.25)]
    assert series("epsilon/max") == [(1, 1.5), (2, 2.75)]
    assert series("epsilon/client/client-0") == [(1, 1.25), (2, 2.25)]
    assert series("epsilon/client/client-1") == [(1, 1.5), (2, 2.75)]
    assert series("bytes/sent") == [(1, 2048.0), (2, 4096.0)]
    assert series("bytes/received") == [(1, 1024.0), (2, 3072.0)]
    assert series("round/errors") == [(1, 0.0), (2, 1.0)]


def test_mlflow_missing_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    cfg = load_config(
        None,
        ["tracking.mlflow=true", f"simulation.output_dir='{tmp_path}'", "simulation.run_name='x'"],
    )
    with pytest.raises(ConfigError) as err:
        check_tracking(cfg.tracking)
    assert str(err.value).count("\n") == 0
    assert "tracking.mlflow" in str(err.value) and "pip install 'privet[mlflow]'" in str(err.value)
    # the simulation stops in its preflight: no run directory, no Ray
    from privet.simulations import simulate

    with pytest.raises(ConfigError, match=r"privet\[mlflow\]"):
        simulate(cfg)
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("mlflow") is None, reason="mlflow is an optional extra"
)
def test_mlflow_logs_params_metrics_and_adapter(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    final = tmp_path / "final_adapter"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    cfg = load_config(None, ["tracking.mlflow=true", "privacy.delta=2e-5"])
    observer = with_tracking(cfg, run_dir=tmp_path, observer=None)
    _drive(observer, tmp_path, final_adapter=final)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("privet")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["privacy.delta"] == "2e-05"
    assert run.data.params["federation.rounds"] == "3"
    hist = client.get_metric_history(run.info.run_id, "accuracy/server")
    assert [(m.step, m.value) for m in hist] == [(0, 0.5), (1, 0.625), (2, 0.875)]
    eps = client.get_metric_history(run.info.run_id, "epsilon/client/client-1")
    assert [(m.step, m.value) for m in eps] == [(1, 1.5), (2, 2.75)]
    files = [f.path for f in client.list_artifacts(run.info.run_id, "final_adapter")]
    assert files == ["final_adapter/adapter_config.json"]
    # everything stays in the run directory
    assert (tmp_path / "mlartifacts").is_dir()
