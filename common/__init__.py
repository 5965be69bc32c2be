"""privet's shared vocabulary: configuration, errors, model building, data and privacy accounting.

Imports neither ``privet.client`` nor ``privet.server``. The Flower bridge lives in
``privet.common.arrays`` and is not imported here, so plain training code stays free of ``flwr``.
"""

from typing import TYPE_CHECKING, Any

from privet.common.config import (
    AdapterConfig,
    AggregationConfig,
    DataConfig,
    FaultsConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    PrivetConfig,
    SimulationConfig,
    TrainConfig,
    config_reference,
    dump_config,
    load_config,
)
from privet.common.errors import (
    BudgetExhaustedError,
    ConfigError,
    DataError,
    ModelError,
    PrivacyError,
    PrivetError,
    UpdateError,
)

if TYPE_CHECKING:
    from privet.common.modeling import (
        BuiltModel,
        build_model,
        load_trainable_state,
        trainable_state,
    )

# Model building pulls in torch and transformers (seconds to import). Loading it on first use keeps
# `privet --help`, `privet certs` and config validation fast; `from privet.common import
# build_model` works as before.
_LAZY = {"BuiltModel", "build_model", "load_trainable_state", "trainable_state"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from privet.common import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'privet.common' has no attribute {name!r}")


__all__ = [
    "AdapterConfig",
    "AggregationConfig",
    "BudgetExhaustedError",
    "BuiltModel",
    "ConfigError",
    "DataConfig",
    "DataError",
    "FaultsConfig",
    "FederationConfig",
    "ModelConfig",
    "ModelError",
    "PrivacyConfig",
    "PrivacyError",
    "PrivetConfig",
    "PrivetError",
    "SimulationConfig",
    "TrainConfig",
    "UpdateError",
    "build_model",
    "config_reference",
    "dump_config",
    "load_config",
    "load_trainable_state",
    "trainable_state",
]
