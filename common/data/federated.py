"""Turn a ``DataConfig`` into per-client train/test sets and a server test set.

The pipeline, each stage with its own seed derived from ``DataConfig.seed``:

1. load the examples (VADER or the user's files);
2. keep a random subset of ``max_examples`` (quick trials);
3. take the server test set: ``test_file`` if given, else hold out ``server_test_fraction``;
4. partition the rest between clients (iid, dirichlet or natural);
5. split each client's share into its train and test parts (``client_test_fraction``).

The same configuration always gives the same split, in every process: a simulated client that
rebuilds the data sees exactly the share the server planned for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from privet.common.config import DataConfig
from privet.common.data.examples import Examples, concat_examples
from privet.common.data.files import load_table
from privet.common.data.partition import (
    IndexArray,
    derive_seed,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    train_test_split,
)
from privet.common.data.vader import load_vader
from privet.common.errors import DataError

__all__ = [
    "ClientData",
    "FederatedData",
    "build_federated_data",
    "cached_federated_data",
    "load_client_data",
    "load_server_test",
    "num_clients",
]

# Stage numbers for derive_seed: changing one stage's randomness never shifts another's.
_SEED_SUBSET, _SEED_SERVER, _SEED_PARTITION, _SEED_CLIENT = 1, 2, 3, 4


@dataclass
class ClientData:
    """One client's share of the data.

    Parameters
    ----------
    name
        ``client-<i>`` for iid/dirichlet, the key (e.g. ``amazon``) for the natural partition.
    train
        Examples the client trains on.
    test
        Examples the client evaluates on (may be empty for a very small client).

    """

    name: str
    train: Examples
    test: Examples


@dataclass
class FederatedData:
    """The whole federation's data.

    Parameters
    ----------
    clients
        One entry per client, in client-index order.
    server_test
        The server's held-out test set.
    num_labels
        Number of classes of the task.

    """

    clients: list[ClientData]
    server_test: Examples
    num_labels: int


def _load(cfg: DataConfig) -> tuple[Examples, Examples | None]:
    """The example pool and, when ``test_file`` is set, the server test set."""
    if cfg.source == "vader":
        return load_vader(cfg.cache_dir, cfg.vader_domains, cfg.vader_threshold), None
    parts = [
        load_table(
            path,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            client_column=cfg.client_column,
            num_labels=cfg.num_labels,
        )
        for path in cfg.train_files
    ]
    test = None
    if cfg.test_file is not None:
        test = load_table(
            cfg.test_file,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            num_labels=cfg.num_labels,
        )
    return concat_examples(parts), test


def _natural_keys(cfg: DataConfig, pool: Examples) -> list[str]:
    key = cfg.natural_key if cfg.source == "vader" else "client"
    if key not in pool.keys:
        raise DataError(
            f"partition = 'natural' needs the key {key!r}, which this data does not have",
            fix="set data.client_column (own files) or use another partition",
        )
    return pool.keys[key]


def build_federated_data(cfg: DataConfig) -> FederatedData:
    """Load, hold out, partition and split the data as ``cfg`` says.

    Parameters
    ----------
    cfg
        The data section of the configuration.

    Returns
    -------
    FederatedData
        Deterministic for ``cfg`` (same seed, same split).

    Raises
    ------
    DataError
        When the data cannot be loaded, or is too small for the server test set or for the
        number of clients.

    """
    pool, server_test = _load(cfg)

    if cfg.max_examples is not None and len(pool) > cfg.max_examples:
        rng = np.random.default_rng(derive_seed(cfg.seed, _SEED_SUBSET))
        pool = pool.subset(np.sort(rng.choice(len(pool), size=cfg.max_examples, replace=False)))

    if server_test is None:
        keep, held = train_test_split(
            np.arange(len(pool)), cfg.server_test_fraction, derive_seed(cfg.seed, _SEED_SERVER)
        )
        if held.size == 0:
            raise DataError(
                f"{len(pool)} examples are too few to hold out a server test set "
                f"(server_test_fraction = {cfg.server_test_fraction})",
                fix="use more data, raise data.server_test_fraction, or give data.test_file",
            )
        server_test = pool.subset(held)
        pool = pool.subset(keep)

    seed = derive_seed(cfg.seed, _SEED_PARTITION)
    shares: list[IndexArray]
    if cfg.partition == "iid":
        shares = iid_partition(len(pool), cfg.num_clients, seed)
        names = [f"client-{i}" for i in range(cfg.num_clients)]
    elif cfg.partition == "dirichlet":
        shares = dirichlet_partition(pool.labels, cfg.num_clients, cfg.alpha, seed)
        names = [f"client-{i}" for i in range(cfg.num_clients)]
    else:
        names, shares = natural_partition(_natural_keys(cfg, pool))

    clients = []
    for i, (name, share) in enumerate(zip(names, shares, strict=True)):
        train, test = train_test_split(
            share, cfg.client_test_fraction, derive_seed(cfg.seed, _SEED_CLIENT, i)
        )
        clients.append(ClientData(name=name, train=pool.subset(train), test=pool.subset(test)))

    if cfg.num_labels is not None:
        num_labels = cfg.num_labels
    else:
        biggest = max(int(pool.labels.max(initial=0)), int(server_test.labels.max(initial=0)))
        num_labels = max(2, biggest + 1)
    return FederatedData(clients=clients, server_test=server_test, num_labels=num_labels)


@functools.lru_cache(maxsize=4)
def _cached(cfg_json: str) -> FederatedData:
    return build_federated_data(DataConfig.model_validate_json(cfg_json))


def cached_federated_data(cfg: DataConfig) -> FederatedData:
    """:func:`build_federated_data`, computed once per process for an equal configuration.

    A client process is asked for its data every round; the cache (keyed on the configuration's
    JSON dump) makes that a lookup.  Treat the result as read-only: it is shared.
    """
    return _cached(cfg.model_dump_json())


def num_clients(cfg: DataConfig) -> int:
    """Number of clients ``cfg`` gives (for the natural partition: the number of keys)."""
    if cfg.partition in ("iid", "dirichlet"):
        return cfg.num_clients
    return len(cached_federated_data(cfg).clients)


def load_client_data(cfg: DataConfig, client_index: int) -> ClientData:
    """The share of client ``client_index`` (0-based), as the ClientApp needs it each round.

    Raises
    ------
    DataError
        When ``client_index`` is not a client of this configuration.

    """
    data = cached_federated_data(cfg)
    if not 0 <= client_index < len(data.clients):
        raise DataError(
            f"client index {client_index} is out of range: this data has {len(data.clients)} "
            "clients",
            fix="match the federation's client count to data.num_clients",
        )
    return data.clients[client_index]


def load_server_test(cfg: DataConfig) -> Examples:
    """The server test set of ``cfg`` (cached like :func:`load_client_data`)."""
    return cached_federated_data(cfg).server_test
