"""Data for privet: loading (VADER, CSV/JSONL/Parquet), partitioning and tokenization."""

from __future__ import annotations

from privet.common.data.examples import (
    Examples,
    GenerationExamples,
    Turn,
    concat_examples,
    concat_generation,
)
from privet.common.data.federated import (
    ClientData,
    FederatedData,
    build_federated_data,
    cached_federated_data,
    load_client_data,
    load_server_test,
    num_clients,
)
from privet.common.data.files import load_table, load_tables
from privet.common.data.partition import (
    derive_seed,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    train_test_split,
)
from privet.common.data.text import (
    TokenizedExamples,
    TokenizedGeneration,
    collate,
    collate_generation,
    length_sorted_microbatches,
)
from privet.common.data.vader import (
    VADER_COUNTS,
    VADER_DOMAINS,
    fetch_vader,
    load_vader,
    resolve_cache_dir,
)

__all__ = [
    "VADER_COUNTS",
    "VADER_DOMAINS",
    "ClientData",
    "Examples",
    "FederatedData",
    "GenerationExamples",
    "TokenizedExamples",
    "TokenizedGeneration",
    "Turn",
    "build_federated_data",
    "cached_federated_data",
    "collate",
    "collate_generation",
    "concat_examples",
    "concat_generation",
    "derive_seed",
    "dirichlet_partition",
    "fetch_vader",
    "iid_partition",
    "length_sorted_microbatches",
    "load_client_data",
    "load_server_test",
    "load_table",
    "load_tables",
    "load_vader",
    "natural_partition",
    "num_clients",
    "resolve_cache_dir",
    "train_test_split",
]
