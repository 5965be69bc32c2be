"""Experiment tracking: TensorBoard event files and MLflow runs, fed by the server's round events.

Each tracker is a :class:`~privet.server.recording.RoundObserver`; :func:`with_tracking` puts the
configured ones beside the caller's observer (the CLI's live table), so the server loop reports to
one object. TensorBoard events are written with torch's ``SummaryWriter``; MLflow through its
``MlflowClient`` (no global "active run", which would not survive the ServerApp's thread). MLflow is
an optional extra; asking for it without it installed stops the run before it starts.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privet.common.config import PrivetConfig, TrackingConfig
from privet.common.errors import ConfigError
from privet.server.recording import RoundObserver, RoundRecord

__all__ = [
    "MlflowTracker",
    "TensorBoardTracker",
    "Tracking",
    "check_tracking",
    "round_scalars",
    "with_tracking",
]

log = logging.getLogger("privet")

MLFLOW_EXTRA = "pip install 'privet[mlflow]'"


def check_tracking(cfg: TrackingConfig) -> None:
    """Fail before any work when a configured tracker's package is missing.

    Raises
    ------
    ConfigError
        ``tracking.mlflow = true`` without mlflow installed; or TensorBoard without ``tensorboard``.

    """
    if cfg.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "tracking.mlflow = true but mlflow is not installed",
            fix=f"{MLFLOW_EXTRA}, or set tracking.mlflow = false",
        )
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tracking.tensorboard = true but the tensorboard package is not installed",
            fix="pip install tensorboard, or set tracking.tensorboard = false",
        )


def round_scalars(record: RoundRecord) -> Iterator[tuple[str, float]]:
    """The scalars of one round, as ``(tag, value)``; a value that was not measured is left out.

    Tags group in TensorBoard by their first part: ``loss/``, ``accuracy/``, ``epsilon/``,
    ``bytes/``, ``round/``.
    """
    plain = {
        "loss/train": record.train_loss,
        "loss/server": record.server_loss,
        "accuracy/server": record.server_accuracy,
        "accuracy/clients": record.client_accuracy,
        "epsilon/max": record.max_epsilon,
    }
    for tag, value in plain.items():
        if value is not None:
            yield tag, float(value)
    for name, eps in sorted(record.epsilon_per_client.items()):
        yield f"epsilon/client/{name}", float(eps)
    # The task's own metrics (a causal LM's perplexity, token accuracy, exact match).
    for side, metrics in (("server", record.server_metrics), ("clients", record.client_metrics)):
        for name, value in sorted(metrics.items()):
            yield f"{name}/{side}", float(value)
    if record.round > 0:
        yield "bytes/sent", float(record.bytes_sent)
        yield "bytes/received", float(record.bytes_received)
        yield "round/clients_trained", float(len(record.clients_trained))
        yield "round/errors", float(len(record.errors) + len(record.rejected))
        yield "round/seconds", float(record.seconds)


class TensorBoardTracker:
    """Writes :func:`round_scalars` of every round as TensorBoard events (step = round)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def run_started(self, *, rounds: int, clients: int, run_dir: Path) -> None:
        """Open the event file."""
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._writer.add_text("run", f"{clients} clients, {rounds} rounds; run directory {run_dir}")

    def round_started(self, server_round: int) -> None:
        """Nothing to write until the round ends."""

    def round_finished(self, record: RoundRecord) -> None:
        """Write the round's scalars and flush, so a crash later loses nothing written."""
        if self._writer is None:
            return
        for tag, value in round_scalars(record):
            self._writer.add_scalar(tag, value, global_step=record.round)
        self._writer.flush()

    def close(self, *, final_adapter: Path | None, failed: bool = False) -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _flat_params(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flat_params(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = "none" if data is None else str(data)
    return out


class MlflowTracker:
    """Logs the config as params, :func:`round_scalars` per round, and the final adapter as artifacts."""

    def __init__(
        self,
        cfg: PrivetConfig,
        *,
        tracking_uri: str,
        experiment: str,
        artifact_location: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.experiment = experiment
        self.run_id: str | None = None
        self._client: Any = None

    def run_started(self, *, rounds: int, clients: int, run_dir: Path) -> None:
        """Create the MLflow run and log every config field as a param."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            exp_id = found.experiment_id
        else:
            # A local store keeps its artifacts in the run directory too, not in the working directory.
            where = self.artifact_location.as_uri() if self.artifact_location else None
            exp_id = client.create_experiment(self.experiment, artifact_location=where)
        run = client.create_run(
            exp_id,
            run_name=Path(run_dir).name,
            tags={"privet.run_dir": str(Path(run_dir).resolve()), "privet.clients": str(clients)},
        )
        self._client, self.run_id = client, run.info.run_id
        params = [Param(k, v) for k, v in _flat_params(self.cfg.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self.run_id, params=params[i : i + 100])

    def round_started(self, server_round: int) -> None:
        """Nothing to log until the round ends."""

    def round_finished(self, record: RoundRecord) -> None:
        """Log the round's scalars with step = round."""
        if self._client is None or self.run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, record.round) for tag, value in round_scalars(record)]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self, *, final_adapter: Path | None, failed: bool = False) -> None:
        """Upload the final adapter folder and end the run."""
        if self._client is None or self.run_id is None:
            return
        if final_adapter is not None and Path(final_adapter).is_dir():
            self._client.log_artifacts(
                self.run_id, str(final_adapter), artifact_path="final_adapter"
            )
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        self._client = None


class Tracking:
    """Fans the server's events out to the caller's observer and the configured trackers.

    A tracker that fails is logged and dropped: tracking must never stop a federation (the run
    directory holds every number regardless).
    """

    def __init__(self, observers: list[Any]) -> None:
        self.observers = observers

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for obs in list(self.observers):
            try:
                getattr(obs, method)(*args, **kwargs)
            except Exception:
                if not isinstance(obs, TensorBoardTracker | MlflowTracker):
                    raise
                log.exception(
                    "tracking: %s failed in %s; it is switched off", type(obs).__name__, method
                )
                self.observers.remove(obs)

    def run_started(self, *, rounds: int, clients: int, run_dir: Path) -> None:
        """Forward to every observer."""
        self._each("run_started", rounds=rounds, clients=clients, run_dir=run_dir)

    def round_started(self, server_round: int) -> None:
        """Forward to every observer."""
        self._each("round_started", server_round)

    def round_finished(self, record: RoundRecord) -> None:
        """Forward to every observer."""
        self._each("round_finished", record)

    def close(self, *, final_adapter: Path | None, failed: bool = False) -> None:
        """Close the trackers (the caller's observer is the caller's to close)."""
        for obs in list(self.observers):
            close = getattr(obs, "close", None)
            if isinstance(obs, TensorBoardTracker | MlflowTracker) and callable(close):
                try:
                    close(final_adapter=final_adapter, failed=failed)
                except Exception:
                    log.exception("tracking: closing %s failed", type(obs).__name__)


def with_tracking(
    cfg: PrivetConfig, *, run_dir: Path, observer: RoundObserver | None
) -> RoundObserver | None:
    """``observer`` plus the trackers ``cfg.tracking`` asks for (``observer`` itself when none)."""
    t = cfg.tracking
    if not (t.tensorboard or t.mlflow):
        return observer
    check_tracking(t)
    observers: list[Any] = [observer] if observer is not None else []
    if t.tensorboard:
        observers.append(TensorBoardTracker(Path(run_dir) / "tensorboard"))
    if t.mlflow:
        # The local default is SQLite in the run directory: MLflow 3 refuses new file stores.
        local = Path(run_dir).resolve()
        uri = t.mlflow_tracking_uri or f"sqlite:///{local / 'mlflow.db'}"
        artifacts = None if t.mlflow_tracking_uri else local / "mlartifacts"
        observers.append(
            MlflowTracker(
                cfg, tracking_uri=uri, experiment=t.mlflow_experiment, artifact_location=artifacts
            )
        )
    return Tracking(observers)
