"""Split example indices between clients: IID, Dirichlet label skew, or by a natural key.

These are our own small partitioners rather than ``flwr-datasets``: that package pulls in the
Hugging Face ``datasets`` stack (and its downloads) for what is a few lines of numpy here.

Every partitioner assigns every example to exactly one part, returns each part's indices sorted
(order inside a client carries no information and sorted output is easy to compare), and is
deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from privet.common.errors import DataError

__all__ = [
    "MAX_DIRICHLET_DRAWS",
    "derive_seed",
    "dirichlet_partition",
    "iid_partition",
    "natural_partition",
    "train_test_split",
]

MAX_DIRICHLET_DRAWS = 100

IndexArray = NDArray[np.int64]


def derive_seed(seed: int, *path: int) -> int:
    """A seed for one stage of a pipeline, independent of the other stages' seeds.

    Parameters
    ----------
    seed
        The user's seed.
    path
        Integers naming the stage (e.g. ``(3, client_index)``).

    Returns
    -------
    int
        A 63-bit seed derived with :class:`numpy.random.SeedSequence`, so that neighbouring
        stages (``seed``, ``seed + 1``) do not share random streams.

    """
    state = np.random.SeedSequence([seed, *path]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if n < num_clients:
        raise DataError(
            f"{n} examples cannot be shared between {num_clients} clients (fewer examples than "
            "clients)",
            fix="lower data.num_clients or use more data (data.max_examples)",
        )


def iid_partition(n: int, num_clients: int, seed: int) -> list[IndexArray]:
    """Shuffle ``0..n-1`` and cut it into ``num_clients`` parts whose sizes differ by at most 1.

    Parameters
    ----------
    n
        Number of examples.
    num_clients
        Number of parts.
    seed
        Seed of the shuffle.

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` index array per client.

    Raises
    ------
    DataError
        When ``n < num_clients`` or ``num_clients < 1``.

    """
    _check_clients(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: ArrayLike,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[IndexArray]:
    """Label-skewed split: each class is shared between clients by Dirichlet(alpha) proportions.

    For every class, the shuffled indices of that class are cut at the cumulative proportions of a
    fresh Dirichlet(``alpha``, ..., ``alpha``) draw over the clients.  Small ``alpha`` gives each
    client few classes; large ``alpha`` approaches an IID split.  When a draw leaves a client with
    fewer than ``min_size`` examples, the whole split is drawn again (at most
    ``MAX_DIRICHLET_DRAWS`` times, from the same seeded stream, so the result stays deterministic).

    Parameters
    ----------
    labels
        One integer label per example.
    num_clients
        Number of parts.
    alpha
        Dirichlet concentration, > 0.
    seed
        Seed of the draws and shuffles.
    min_size
        Fewest examples any client may get.

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` index array per client.

    Raises
    ------
    DataError
        When there are too few examples, ``alpha <= 0``, or no draw gives every client
        ``min_size`` examples.

    """
    y = np.asarray(labels).reshape(-1)
    n = int(y.shape[0])
    _check_clients(n, num_clients)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}", fix="set data.alpha > 0")
    if min_size < 0 or n < num_clients * min_size:
        raise DataError(
            f"{n} examples cannot give each of {num_clients} clients {min_size} examples",
            fix="lower data.num_clients",
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    smallest = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(y == cls)).astype(np.int64)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            # Cut points from the cumulative shares; the last cut is the end, so nothing is lost
            # to rounding and every index lands in exactly one client.
            cuts = np.floor(np.cumsum(shares)[:-1] * idx.size).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        smallest = min(r.size for r in result)
        if smallest >= min_size:
            return result
    raise DataError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DIRICHLET_DRAWS} draws gave each of "
        f"{num_clients} clients at least {min_size} examples (the last gave one client {smallest})",
        fix="raise data.alpha or lower data.num_clients",
    )


def natural_partition(keys: Sequence[str]) -> tuple[list[str], list[IndexArray]]:
    """One part per distinct key (a domain, a document, a user).

    Parameters
    ----------
    keys
        The key of each example.

    Returns
    -------
    tuple
        The sorted distinct keys, and for each the sorted ``int64`` indices of its examples.

    Raises
    ------
    DataError
        When ``keys`` is empty.

    """
    if len(keys) == 0:
        raise DataError("no examples to partition", fix="check the data source")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    names = sorted(groups)
    return names, [np.asarray(groups[name], dtype=np.int64) for name in names]


def train_test_split(
    indices: ArrayLike, test_fraction: float, seed: int
) -> tuple[IndexArray, IndexArray]:
    """Split indices at random into a train and a test part.

    The test part gets ``round(len * test_fraction)`` indices (half rounds up), but never all of
    them: at least one index stays in train when there is one.

    Parameters
    ----------
    indices
        The indices to split (any integers, e.g. one client's example positions).
    test_fraction
        Share for the test part, in ``[0, 1)``.
    seed
        Seed of the shuffle.

    Returns
    -------
    tuple of numpy.ndarray
        ``(train, test)``, each sorted ``int64``; together they hold every index once.

    Raises
    ------
    DataError
        When ``test_fraction`` is outside ``[0, 1)``.

    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0 <= test_fraction < 1:
        raise DataError(f"test fraction must lie in [0, 1), got {test_fraction}")
    n = idx.size
    n_test = min(int(np.floor(n * test_fraction + 0.5)), max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(idx[perm[n_test:]]), np.sort(idx[perm[:n_test]])
