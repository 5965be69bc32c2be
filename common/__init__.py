"""privet's shared vocabulary: configuration, errors, model building, data and privacy accounting.

Imports neither ``privet.client`` nor ``privet.server``. The Flower bridge lives in
``privet.common.arrays`` and is not imported here, so plain training code stays free of ``flwr``.
"""

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
from privet.common.modeling import BuiltModel, build_model, load_trainable_state, trainable_state

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
