"""Data for privet: loading (VADER, Shakespeare, CSV/JSONL/Parquet, instructions), partitioning and tokenization."""

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
    classification_examples,
    is_generation_source,
    load_client_data,
    load_server_test,
    num_clients,
)
from privet.common.data.files import LabelledRows, load_table, load_tables
from privet.common.data.instructions import load_instructions
from privet.common.data.partition import (
    derive_seed,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    train_test_split,
)
from privet.common.data.shakespeare import load_shakespeare
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
    load_vader_instructions,
    resolve_cache_dir,
)

__all__ = [
    "VADER_COUNTS",
    "VADER_DOMAINS",
    "ClientData",
    "Examples",
    "FederatedData",
    "GenerationExamples",
    "LabelledRows",
    "TokenizedExamples",
    "TokenizedGeneration",
    "Turn",
    "build_federated_data",
    "cached_federated_data",
    "classification_examples",
    "collate",
    "collate_generation",
    "concat_examples",
    "concat_generation",
    "derive_seed",
    "dirichlet_partition",
    "fetch_vader",
    "iid_partition",
    "is_generation_source",
    "length_sorted_microbatches",
    "load_client_data",
    "load_instructions",
    "load_server_test",
    "load_shakespeare",
    "load_table",
    "load_tables",
    "load_vader",
    "load_vader_instructions",
    "natural_partition",
    "num_clients",
    "resolve_cache_dir",
    "train_test_split",
]
