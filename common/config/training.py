"""[train]: the local optimisation a client runs each round."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from privet.common.config._base import _Section

__all__ = ["TrainConfig"]


class TrainConfig(_Section):
    """Local training on each client in each round."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Local optimizer.")
    lr: float = Field(
        1e-2,
        gt=0,
        le=10,
        description="Learning rate. DP-SGD wants a larger one than non-private training (noise averages out).",
    )
    weight_decay: float = Field(
        0.0, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    local_epochs: float = Field(
        0.25,
        gt=0,
        le=100,
        description="Passes over the client's training data per round (may be fractional).",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="Expected (logical) batch size; with DP the batch is Poisson-sampled with rate batch_size / n.",
    )
    physical_batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description=(
            "Largest micro-batch put through the model at once; batches are cut into length-sorted "
            "micro-batches so little padding is computed. Does not change the math. Default: 16 on CPU, "
            "128 on GPU."
        ),
    )
    eval_batch_size: int = Field(128, ge=1, le=65536, description="Batch size for evaluation.")
    seed: int = Field(0, ge=0, description="Seed for sampling, noise and initialisation.")
    num_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads per client (default: the CPUs Ray gives it).",
    )
