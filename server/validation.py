"""Checks every train reply must pass before it is aggregated.

``RecordingStrategy(checks=...)`` runs them; a reply any check rejects is dropped, logged with the
client and the reason, and counted in the round's record. Flower's strategies check only that a
reply has one ``ArrayRecord`` and the weighting metric; they average a NaN, a wrong shape (it
raises) or a huge update as readily as a good one. Hence our own checks, on top of theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message

from privet.common.arrays import arrayrecord_to_state, check_update
from privet.common.errors import UpdateError
from privet.common.protocol import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID
from privet.server.recording import ReplyCheck, RoundCheck

__all__ = [
    "check_num_examples",
    "check_structure",
    "make_reply_checks",
    "make_round_checks",
    "norm_outliers",
    "update_norm",
]


def check_structure(msg: Message, sent: ArrayRecord) -> str | None:
    """Keys, shapes and dtypes equal to what was sent, and every value finite."""
    if ARRAYS not in msg.content.array_records:
        return "the reply holds no 'arrays' record"
    if METRICS not in msg.content.metric_records:
        return "the reply holds no 'metrics' record"
    try:
        got = arrayrecord_to_state(msg.content.array_records[ARRAYS])
        check_update(got, arrayrecord_to_state(sent), who="update")
    except UpdateError as exc:
        return str(exc).removeprefix("update: ")
    except Exception as exc:  # an array that cannot even be decoded
        return f"the arrays cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def update_norm(reply: ArrayRecord, sent: ArrayRecord) -> float:
    """L2 norm of ``reply - sent`` over every array (float64 sums; the shapes must match)."""
    total = 0.0
    for key, array in sent.items():
        diff = reply[key].numpy().astype(np.float64) - array.numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def check_num_examples(
    msg: Message,
    *,
    max_examples: Mapping[int, int] | None = None,
    max_per_client: int | None = None,
) -> str | None:
    """``num-examples`` is a positive whole number, at most the client's known training set size.

    ``max_examples`` maps a ``partition-id`` to the size of that client's training split, where the
    server knows it (a simulation); a client that claims more inflates its weight in the average.
    ``max_per_client`` (``federation.max_examples_per_client``) bounds every claim, also where the
    server cannot know a site's data (a deployment).
    """
    metrics = msg.content.metric_records.get(METRICS)
    raw = None if metrics is None else metrics.get(NUM_EXAMPLES)
    if raw is None:
        return "the reply reports no num-examples"
    n = float(raw)  # type: ignore[arg-type]
    if not math.isfinite(n) or n <= 0 or n != int(n):
        return f"num-examples = {raw!r} is not a positive whole number"
    if max_per_client is not None and n > max_per_client:
        return (
            f"num-examples = {int(n)} exceeds federation.max_examples_per_client = {max_per_client}"
        )
    if max_examples is not None and metrics is not None and PARTITION_ID in metrics:
        limit = max_examples.get(int(metrics[PARTITION_ID]))  # type: ignore[arg-type]
        if limit is not None and n > limit:
            return f"num-examples = {int(n)} exceeds the client's {limit} training examples"
    return None


def make_reply_checks(
    *,
    max_update_norm: float | None = None,
    max_examples: Mapping[int, int] | None = None,
    max_per_client: int | None = None,
) -> list[ReplyCheck]:
    """The checks of ``federation``: structure, num-examples, then the optional norm bound.

    Parameters
    ----------
    max_update_norm
        Reject an update whose L2 distance to the weights sent exceeds this (``None``: no bound).
    max_examples
        Training split size per ``partition-id``, where known.
    max_per_client
        Largest ``num-examples`` any reply may report (``federation.max_examples_per_client``).

    Returns
    -------
    list
        Checks for ``RecordingStrategy(checks=...)``; each returns the reason to reject, or None.

    """

    def _examples(msg: Message, sent: ArrayRecord) -> str | None:
        return check_num_examples(msg, max_examples=max_examples, max_per_client=max_per_client)

    checks: list[ReplyCheck] = [check_structure, _examples]
    if max_update_norm is not None:
        bound = max_update_norm

        def _norm(msg: Message, sent: ArrayRecord) -> str | None:
            # Runs after check_structure accepted the reply, so the shapes match.
            norm = update_norm(msg.content.array_records[ARRAYS], sent)
            if norm > bound:
                return f"update norm {norm:.4g} exceeds federation.max_update_norm = {bound:.4g}"
            return None

        checks.append(_norm)
    return checks


def norm_outliers(norms: Sequence[float], *, factor: float) -> list[str | None]:
    """For each update norm, the reason to reject it as an outlier among its round's, or None.

    A norm is an outlier when it exceeds ``factor`` times the median of the *other* norms. Leaving
    the norm itself out of its median is what makes the rule hold with two sites: a site that
    scales its update 1000x is compared with the honest one and dropped, while the honest one,
    compared with the attacker, stays. A round with a single reply has nothing to compare with.
    """
    out: list[str | None] = []
    for i, norm in enumerate(norms):
        others = [n for j, n in enumerate(norms) if j != i]
        if not others:
            out.append(None)
            continue
        median = float(np.median(others))
        if norm > factor * median:
            out.append(
                f"update norm {norm:.4g} exceeds federation.update_norm_factor = {factor:g} times "
                f"the median {median:.4g} of the round's other replies"
            )
        else:
            out.append(None)
    return out


def make_round_checks(*, norm_factor: float | None) -> list[RoundCheck]:
    """Checks that compare a round's replies with each other (after :func:`make_reply_checks`).

    Parameters
    ----------
    norm_factor
        ``federation.update_norm_factor`` in force (``None``: no relative norm bound).

    Returns
    -------
    list
        Checks for ``RecordingStrategy(round_checks=...)``; each returns one reason or None per
        reply.

    """
    if norm_factor is None:
        return []
    factor = norm_factor

    def _relative_norm(replies: Sequence[Message], sent: ArrayRecord) -> list[str | None]:
        norms = [update_norm(m.content.array_records[ARRAYS], sent) for m in replies]
        return norm_outliers(norms, factor=factor)

    return [_relative_norm]
