"""Configuration: one validated pydantic model per concern, loaded from TOML plus ``--set`` overrides.

The whole configuration is parsed once, at the boundary (the command line or the caller of the
Python API); the rest of the code receives typed objects, never string keys.  Every field carries a
description that doubles as the config reference (``privet config-reference`` prints it).

One file per concern: the sections in ``model``, ``privacy``, ``training``, ``data``, ``federation``, ``runtime``;
the rules that span sections in ``rules``; reading and writing in ``loading``.
"""

from __future__ import annotations

from privet.common.config._base import DEFAULT_MODEL as DEFAULT_MODEL
from privet.common.config.data import DataConfig
from privet.common.config.federation import (
    ROBUST_STRATEGIES,
    STRATEGIES,
    AggregationConfig,
    FaultsConfig,
    FederationConfig,
)
from privet.common.config.loading import (
    apply_overrides,
    config_reference,
    dump_config,
    format_validation_error,
    load_config,
)
from privet.common.config.model import AdapterConfig, ModelConfig
from privet.common.config.privacy import ClientLevelConfig, PrivacyConfig, SecureAggregationConfig
from privet.common.config.rules import PrivetConfig, require_plain_averaging, sampled_per_round
from privet.common.config.runtime import DeploymentConfig, SimulationConfig, TrackingConfig
from privet.common.config.training import TrainConfig

__all__ = [
    "ROBUST_STRATEGIES",
    "STRATEGIES",
    "AdapterConfig",
    "AggregationConfig",
    "ClientLevelConfig",
    "DataConfig",
    "DeploymentConfig",
    "FaultsConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "PrivetConfig",
    "SecureAggregationConfig",
    "SimulationConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_reference",
    "dump_config",
    "format_validation_error",
    "load_config",
    "require_plain_averaging",
    "sampled_per_round",
]
