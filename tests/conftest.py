import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from privet.common.config import AdapterConfig, ModelConfig
from privet.common.modeling import BuiltModel, build_model


def tiny_model(**adapter: object) -> BuiltModel:
    """A one-layer cut of the real MiniLM: real weights, small enough for unit tests."""
    return build_model(
        ModelConfig(num_hidden_layers=1, max_length=32),
        AdapterConfig(**adapter),
        num_labels=2,
        seed=0,
    )


@pytest.fixture
def tiny() -> BuiltModel:
    return tiny_model()
