"""[simulation], [tracking] and [deployment]: where and how a federation runs and reports."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from privet.common.config._base import _Section

__all__ = ["DeploymentConfig", "SimulationConfig", "TrackingConfig"]


class SimulationConfig(_Section):
    """The single-machine simulation harness (Flower's Simulation Engine on Ray)."""

    engine: Literal["ray", "inprocess"] = Field(
        "ray",
        description=(
            "'ray': Flower's Simulation Engine, clients in parallel Ray workers. 'inprocess': the same "
            "apps in this one process, clients one after another (no Ray start-up; small studies and tests), "
            "or in parallel lanes over the GPUs with gpus_per_client; the clients and the server's "
            "evaluation share one base model per lane."
        ),
    )
    cpus_per_client: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="CPUs Ray reserves per client; clients run in parallel up to the CPU count.",
    )
    gpus_per_client: float = Field(
        0.0,
        ge=0,
        le=64,
        description=(
            "GPU share per client. 'ray': what Ray reserves per client (schedules, does not limit "
            "memory). 'inprocess' (at most 1): 0 runs clients one after another on one device; above "
            "0, with CUDA, floor(1 / share) clients at once per visible GPU, each lane with its own "
            "base model on its GPU (1: one lane and one base model per GPU), replies in the same order."
        ),
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs Ray may use (default: all of this machine)."
    )
    nodes: Literal["per_round", "population"] = Field(
        "per_round",
        description=(
            "Flower nodes the simulation runs. 'per_round': only as many as clients train per "
            "round; each message names the client a node plays (its data, seed and own privacy "
            "ledger), so a run's cost grows with the clients that train, not the population. "
            "'population': one node per client, as Flower does it."
        ),
    )
    output_dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+$", description="Run directory name (default: a timestamp)."
    )
    state_dir: Path | None = Field(
        None, description="Where clients keep their ledgers (default: <run dir>/clients)."
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description=(
            "Run on an existing Ray cluster at this address (e.g. '127.0.0.1:6379', 'auto' or "
            "'ray://head:10001') instead of starting a private one; num_cpus is then the cluster's. "
            "Every node needs privet installed and must see the run directory (shared filesystem)."
        ),
    )

    @model_validator(mode="after")
    def _cluster_owns_resources(self) -> SimulationConfig:
        if self.ray_address is not None and self.num_cpus is not None:
            raise ValueError(
                "num_cpus cannot be set with ray_address: an existing Ray "
                "cluster's CPUs are its own (unset num_cpus)"
            )
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError(f"ray_address needs engine = 'ray' (got {self.engine!r})")
        if self.engine == "inprocess" and self.gpus_per_client > 1:
            raise ValueError(
                f"gpus_per_client = {self.gpus_per_client:g} with engine = 'inprocess': the in-process "
                "engine runs one client on one device; set gpus_per_client to at most 1 (1: one "
                "client per GPU, 0.5: two) or use engine = 'ray'"
            )
        return self


class TrackingConfig(_Section):
    """Experiment tracking: the server writes each round to TensorBoard and/or MLflow."""

    tensorboard: bool = Field(
        False,
        description=(
            "Write per-round scalars (loss, accuracy, epsilon per client and the largest, bytes) as "
            "TensorBoard events under <run dir>/tensorboard (tensorboard --logdir runs)."
        ),
    )
    mlflow: bool = Field(
        False,
        description=(
            "Log the config as params, per-round metrics and the final adapter to MLflow. Needs the "
            "optional extra: pip install 'privet[mlflow]'."
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="MLflow tracking URI (default: a local SQLite store, sqlite:///<run dir>/mlflow.db, artifacts in <run dir>/mlartifacts).",
    )
    mlflow_experiment: str = Field(
        "privet", min_length=1, description="MLflow experiment the run is logged under."
    )


class DeploymentConfig(_Section):
    """The coordinator's network side when federating across machines (`privet server`)."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description=(
            "Interface the sites' address listens on: 127.0.0.1 (this machine only, the default), "
            "a public address of this machine, or 0.0.0.0 (all interfaces; `privet server --public "
            "HOST`). Only the federation protocol is served there (a TLS proxy in front of Flower's "
            "SuperLink); run control stays on loopback."
        ),
    )
    port: int = Field(9092, ge=1, le=65535, description="Port clients connect to (HTTPS).")
    health_port: int = Field(
        9098,
        ge=1,
        le=65535,
        description="Local port of the coordinator's gRPC health service (bound to 127.0.0.1).",
    )
    startup_timeout: float = Field(
        120.0, gt=0, le=3600, description="Seconds to wait for the coordinator to become healthy."
    )
