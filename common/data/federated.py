"""Turn a ``DataConfig`` into per-client train/test sets and a server test set.

The pipeline, each stage with its own seed derived from ``DataConfig.seed``:

1. load the examples (VADER, Shakespeare or the user's files);
2. keep a random subset of ``max_examples`` (quick trials);
3. take the server test set: ``test_file`` if given, else hold out ``server_test_fraction``;
4. partition the rest between clients (iid, dirichlet or natural);
5. split each client's share into its train and test parts (``client_test_fraction``).

The same configuration always gives the same split, in every process: a simulated client that
rebuilds the data sees exactly the share the server planned for it.

Generation sources (:func:`is_generation_source`) give :class:`GenerationExamples` through the
same stages; classification sources give :class:`Examples`.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from privet.common.config import DataConfig
from privet.common.data.examples import (
    Examples,
    GenerationExamples,
    concat_examples,
    concat_generation,
)
from privet.common.data.files import load_tables
from privet.common.data.instructions import file_shape, load_instructions
from privet.common.data.partition import (
    IndexArray,
    derive_seed,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    train_test_split,
)
from privet.common.data.shakespeare import load_shakespeare
from privet.common.data.vader import load_vader, load_vader_instructions
from privet.common.errors import DataError

__all__ = [
    "ClientData",
    "FederatedData",
    "build_federated_data",
    "cached_federated_data",
    "classification_examples",
    "is_generation_source",
    "load_client_data",
    "load_server_test",
    "num_clients",
]

# Stage numbers for derive_seed: changing one stage's randomness never shifts another's.
_SEED_SUBSET, _SEED_SERVER, _SEED_PARTITION, _SEED_CLIENT = 1, 2, 3, 4

#: A dataset of either task: labelled texts, or prompts and targets for a causal LM.
Dataset = Examples | GenerationExamples


@dataclass
class ClientData:
    """One client's share of the data.

    Parameters
    ----------
    name
        ``client-<i>`` for iid/dirichlet, the key (e.g. ``amazon``) for the natural partition.
    train
        Examples the client trains on (:class:`GenerationExamples` for a generation source).
    test
        Examples the client evaluates on (may be empty for a very small client).

    """

    name: str
    train: Dataset
    test: Dataset


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
        Number of classes of the task; for generation data the number of answer choices (e.g. 2
        for ``vader_instructions``), or 0 for free text.
    label_names
        The class names in label order when the data names its classes (or
        ``data.label_names`` gives them), else None; for generation data the answer choices.

    """

    clients: list[ClientData]
    server_test: Dataset
    num_labels: int
    label_names: tuple[str, ...] | None = None


def is_generation_source(cfg: DataConfig) -> bool:
    """True when ``cfg`` gives data for a causal language model (:class:`GenerationExamples`).

    ``shakespeare`` and ``vader_instructions`` always do, ``vader`` never does.  For
    ``source = 'files'`` the first train file decides: JSON lines whose first row has
    ``prompt``/``completion`` or ``messages`` are instructions.  A file that cannot be read here
    counts as classification (the loader then reports what is wrong with it).
    """
    if cfg.source in ("shakespeare", "vader_instructions"):
        return True
    if cfg.source != "files" or not cfg.train_files:
        return False
    try:
        shape = file_shape(
            cfg.train_files[0], text_column=cfg.text_column, label_column=cfg.label_column
        )
    except DataError:
        return False
    return shape == "instructions"


def classification_examples(data: Dataset) -> Examples:
    """``data`` when it is labelled classification data, else one clear :class:`DataError`.

    For the code paths that only classify (tokenizing for a classifier, label flipping, the site
    CSV export) until the causal-LM task takes generation data there.
    """
    if isinstance(data, Examples):
        return data
    raise DataError(
        "this data is for a causal language model (prompts and targets), and this step needs "
        "labelled classification data",
        fix="use data.source = 'vader' or classification files (text and label columns)",
    )


def _load(cfg: DataConfig) -> tuple[Dataset, Dataset | None, tuple[str, ...] | None]:
    """The example pool, the server test set when ``test_file`` is set, and the class names."""
    if cfg.source == "vader":
        return load_vader(cfg.cache_dir, cfg.vader_domains, cfg.vader_threshold), None, None
    if cfg.source == "vader_instructions":
        pool = load_vader_instructions(cfg.cache_dir, cfg.vader_domains, cfg.vader_threshold)
        return pool, None, pool.answer_choices
    if cfg.source == "shakespeare":
        return _top_roles(cfg, load_shakespeare(cfg.cache_dir)), None, None
    paths = list(cfg.train_files) + ([cfg.test_file] if cfg.test_file is not None else [])
    columns = [cfg.client_column] * len(cfg.train_files) + [None] * (cfg.test_file is not None)
    shapes = [
        file_shape(p, text_column=cfg.text_column, label_column=cfg.label_column) for p in paths
    ]
    if len(set(shapes)) > 1:
        odd = next(p for p, shape in zip(paths, shapes, strict=True) if shape != shapes[0])
        said = {"instructions": "instruction rows", "classification": "classification rows"}
        raise DataError(
            f"{paths[0]} holds {said[shapes[0]]} but {odd} does not",
            fix="give every data file (train_files and test_file) the same kind of rows",
        )
    parts: list[Dataset]
    names: tuple[str, ...] | None = None
    if shapes[0] == "instructions":
        parts = list(load_instructions(paths, client_columns=columns))
    else:
        tables, names = load_tables(
            paths,
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            client_columns=columns,
            num_labels=cfg.num_labels,
            label_names=cfg.label_names,
        )
        parts = list(tables)
    test = parts.pop() if cfg.test_file is not None else None
    if cfg.partition == "by_file":
        parts = [
            _with_key(p, "file", [name] * len(p))
            for p, name in zip(parts, _file_clients(cfg), strict=True)
        ]
    return _concat(parts), test, names


def _with_key(data: Dataset, name: str, values: list[str]) -> Dataset:
    keys = {**data.keys, name: values}
    if isinstance(data, Examples):
        return Examples(texts=data.texts, labels=data.labels, keys=keys)
    return GenerationExamples(
        targets=data.targets, prompts=data.prompts, keys=keys, answer_choices=data.answer_choices
    )


def _concat(parts: list[Dataset]) -> Dataset:
    if all(isinstance(p, Examples) for p in parts):
        return concat_examples([p for p in parts if isinstance(p, Examples)])
    return concat_generation([p for p in parts if isinstance(p, GenerationExamples)])


def _top_roles(cfg: DataConfig, pool: GenerationExamples) -> GenerationExamples:
    """With the natural partition, only the ``num_clients`` roles with the most speeches."""
    if cfg.partition != "natural":
        return pool
    counts = Counter(pool.keys["role"])
    if cfg.num_clients > len(counts):
        raise DataError(
            f"data.num_clients = {cfg.num_clients} but Shakespeare has {len(counts)} speaking roles "
            "with enough speeches",
            fix=f"set data.num_clients to at most {len(counts)}",
        )
    ranked = sorted(counts, key=lambda role: (-counts[role], role))
    chosen = set(ranked[: cfg.num_clients])
    return pool.subset([i for i, role in enumerate(pool.keys["role"]) if role in chosen])


def _file_clients(cfg: DataConfig) -> list[str]:
    """The client names of ``partition = 'by_file'``: file names without their extension."""
    stems = [Path(p).stem for p in cfg.train_files]
    # Two files of the same name in different folders still make two clients.
    return stems if len(set(stems)) == len(stems) else [str(p) for p in cfg.train_files]


def _check_classes(
    cfg: DataConfig, pool: Examples, test: Examples, names: tuple[str, ...] | None
) -> int:
    """The number of classes; refuses a training set of one class and unused integer labels."""
    seen = np.unique(pool.labels)
    if seen.size < 2:
        only = (names[int(seen[0])] if names else str(int(seen[0]))) if seen.size else "none"
        where = "data.train_files" if cfg.source == "files" else "the training data"
        raise DataError(
            f"{where} hold only one class (label {only}): a classifier cannot learn from it "
            "and would report 100% accuracy.",
            fix="add examples of the other classes, or check data.label_column",
        )
    if names is not None:
        return len(names)
    if cfg.num_labels is not None:
        return cfg.num_labels
    used = np.union1d(seen, np.unique(test.labels))
    biggest = int(used.max())
    gaps = sorted(set(range(biggest + 1)) - {int(v) for v in used})
    if gaps:
        shown = ", ".join(str(g) for g in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
        raise DataError(
            f"the labels are {', '.join(str(int(v)) for v in used[:10])}: classes {shown} never "
            f"occur, so the model would get {biggest + 1} outputs.",
            fix=(
                f"renumber the labels 0..{used.size - 1}, write them as names, or set "
                f"data.num_labels = {biggest + 1} to keep the unused classes"
            ),
        )
    return max(2, biggest + 1)


def _natural_keys(cfg: DataConfig, pool: Dataset) -> list[str]:
    key = cfg.natural_key if cfg.source != "files" else "client"
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
    pool, server_test, label_names = _load(cfg)

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
        shares = dirichlet_partition(_labels(pool), cfg.num_clients, cfg.alpha, seed)
        names = [f"client-{i}" for i in range(cfg.num_clients)]
    elif cfg.partition == "by_file":
        # File order, not sorted names: client i is the i-th file of data.train_files.
        keys = np.asarray(pool.keys["file"], dtype=object)
        names = list(dict.fromkeys(_file_clients(cfg)))
        shares = [np.flatnonzero(keys == name).astype(np.int64) for name in names]
        empty = [name for name, share in zip(names, shares, strict=True) if share.size == 0]
        if empty:
            raise DataError(
                f"data.partition = 'by_file': no example of {empty[0]} is left after "
                f"data.max_examples = {cfg.max_examples} and the server test split.",
                fix="raise data.max_examples (or leave it out), or give data.test_file",
            )
    else:
        names, shares = natural_partition(_natural_keys(cfg, pool))

    clients = []
    for i, (name, share) in enumerate(zip(names, shares, strict=True)):
        train, test = train_test_split(
            share, cfg.client_test_fraction, derive_seed(cfg.seed, _SEED_CLIENT, i)
        )
        clients.append(ClientData(name=name, train=pool.subset(train), test=pool.subset(test)))

    if isinstance(pool, Examples):
        assert isinstance(server_test, Examples)
        num_labels = _check_classes(cfg, pool, server_test, label_names)
    else:
        num_labels = len(pool.answer_choices) if pool.answer_choices else 0
        label_names = pool.answer_choices
    return FederatedData(
        clients=clients, server_test=server_test, num_labels=num_labels, label_names=label_names
    )


def _labels(pool: Dataset) -> NDArray[np.int64]:
    """Labels for the Dirichlet partition: the class, or the index of the answer choice."""
    if isinstance(pool, Examples):
        return pool.labels
    if pool.answer_choices is None:
        raise DataError(
            "data.partition = 'dirichlet' splits by label, and this generation data has none "
            "(free-text targets)",
            fix="use partition = 'iid' or 'natural'",
        )
    index = {choice: i for i, choice in enumerate(pool.answer_choices)}
    return np.asarray([index[t] for t in pool.targets], dtype=np.int64)


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
    if cfg.partition in ("iid", "dirichlet") or cfg.source == "shakespeare":
        return cfg.num_clients
    if cfg.partition == "by_file":
        return len(cfg.train_files)
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


def load_server_test(cfg: DataConfig) -> Dataset:
    """The server test set of ``cfg`` (cached like :func:`load_client_data`)."""
    return cached_federated_data(cfg).server_test
