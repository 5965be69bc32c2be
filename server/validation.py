"""Checks every train reply must pass before it is aggregated.

``RecordingStrategy(checks=...)`` runs them; a reply any check rejects is dropped, logged with the
client and the reason, and counted in the round's record. Flower's strategies check only that a
reply has one ``ArrayRecord`` and the weighting metric; they average a NaN, a wrong shape (it
raises) or a huge update as readily as a good one. Hence our own checks, on top of theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

from privet.common.arrays import arrayrecord_to_state, check_update
from privet.common.errors import UpdateError
from privet.server.recording import ReplyCheck

__all__ = ["check_num_examples", "check_structure", "make_reply_checks", "update_norm"]


def check_structure(msg: Message, sent: ArrayRecord) -> str | None:
    """Keys, shapes and dtypes equal to what was sent, and every value finite."""
    if "arrays" not in msg.content.array_records:
        return "the reply holds no 'arrays' record"
    if "metrics" not in msg.content.metric_records:
        return "the reply holds no 'metrics' record"
    try:
        got = arrayrecord_to_state(msg.content.array_records["arrays"])
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
    msg: Message, *, max_examples: Mapping[int, int] | None = None
) -> str | None:
    """``num-examples`` is a positive whole number, at most the client's known training set size.

    ``max_examples`` maps a ``partition-id`` to the size of that client's training split, where the
    server knows it (a simulation); a client that claims more inflates its weight in the average.
    """
    metrics = msg.content.metric_records.get("metrics")
    raw = None if metrics is None else metrics.get("num-examples")
    if raw is None:
        return "the reply reports no num-examples"
    n = float(raw)  # type: ignore[arg-type]
    if not math.isfinite(n) or n <= 0 or n != int(n):
        return f"num-examples = {raw!r} is not a positive whole number"
    if max_examples is not None and metrics is not None and "partition-id" in metrics:
        limit = max_examples.get(int(metrics["partition-id"]))  # type: ignore[arg-type]
        if limit is not None and n > limit:
            return f"num-examples = {int(n)} exceeds the client's {limit} training examples"
    return None


def make_reply_checks(
    *, max_update_norm: float | None = None, max_examples: Mapping[int, int] | None = None
) -> list[ReplyCheck]:
    """The checks of ``federation``: structure, num-examples, then the optional norm bound.

    Parameters
    ----------
    max_update_norm
        Reject an update whose L2 distance to the weights sent exceeds this (``None``: no bound).
    max_examples
        Training split size per ``partition-id``, where known.

    Returns
    -------
    list
        Checks for ``RecordingStrategy(checks=...)``; each returns the reason to reject, or None.

    """

    def _examples(msg: Message, sent: ArrayRecord) -> str | None:
        return check_num_examples(msg, max_examples=max_examples)

    checks: list[ReplyCheck] = [check_structure, _examples]
    if max_update_norm is not None:
        bound = max_update_norm

        def _norm(msg: Message, sent: ArrayRecord) -> str | None:
            # Runs after check_structure accepted the reply, so the shapes match.
            norm = update_norm(msg.content.array_records["arrays"], sent)
            if norm > bound:
                return f"update norm {norm:.4g} exceeds federation.max_update_norm = {bound:.4g}"
            return None

        checks.append(_norm)
    return checks
