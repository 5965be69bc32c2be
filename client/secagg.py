"""The client's half of secure aggregation: Flower's ``secaggplus_mod`` around privet's train function.

Flower's mod runs the client side of SecAgg+ (key generation, Shamir shares, masking, unmasking
shares) and keeps its state in ``context.state`` between the four stages.  It was written for the
legacy API: it reads the train function's reply as a legacy ``FitRes`` (``fitres.parameters``,
``fitres.num_examples``).  privet's train function answers in the Message API (``arrays`` and
``metrics``), so :func:`secagg_mod` adapts between the two around Flower's mod:

* the stage record and privet's weighting record are taken off the message before the train
  function (and Flower's clipping mod, which wants exactly one config record) sees it;
* the reply's weights are handed to Flower's mod as a ``FitRes`` in the order of the arrays the
  server sent, with weight 1 (client-level DP) or the number of examples; Flower's mod then masks
  them and empties every array record, so no weight leaves in the clear; the metrics stay;
* an error reply of the train function (a budget refusal, a crash) is returned as it is, which
  makes the client a dropout SecAgg+ recovers from.

A train message without a SecAgg+ record is refused when this client requires secure aggregation
(fail-closed: its weights would leave unmasked), and passed through otherwise.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict

from privet.client.flower_door import (
    SECAGG_CONFIGS_KEY,
    ClientAppCallable,
    Mod,
    legacy_fit_records,
    secaggplus_mod,
)
from privet.common.config import SecureAggregationConfig
from privet.common.privacy.secagg import SECAGG_RECORD
from privet.common.protocol import (
    ARRAYS,
    MAX_WEIGHT,
    METRICS,
    NUM_EXAMPLES,
    UNIFORM_WEIGHTS,
    ErrorCode,
)

__all__ = ["ERROR_SECAGG_REQUIRED", "secagg_mod"]

log = logging.getLogger("privet")

#: Error code of a client that requires secure aggregation and got a plain train message.
ERROR_SECAGG_REQUIRED = int(ErrorCode.SECAGG_REQUIRED)


class _InnerError(Exception):
    """Carries the train function's error reply out through Flower's mod."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secagg_mod(*, required: bool, sa: SecureAggregationConfig) -> Mod:
    """The train mod that runs SecAgg+ (outermost: clipping and training happen inside it).

    Parameters
    ----------
    required
        Refuse a train message that does not run SecAgg+ (``privacy.secure_aggregation = true``).
    sa
        The ``privacy.secagg`` section (this client's own limit on the range of its weights).

    """

    def _mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if SECAGG_CONFIGS_KEY not in msg.content.config_records:
            if required:
                return Message(
                    Error(
                        code=ERROR_SECAGG_REQUIRED,
                        reason="this client requires secure aggregation "
                        "(privacy.secure_aggregation = true) and the server sent a plain train "
                        "message; it does not send its weights in the clear",
                    ),
                    reply_to=msg,
                )
            return call_next(msg, context)
        weighting = msg.content.config_records.get(SECAGG_RECORD, ConfigRecord())

        def _train(inner: Message, ctx: Context) -> Message:
            # Flower's mod passes the whole message on; the train function gets privet's records.
            sent = inner.content.array_records.get(ARRAYS, ArrayRecord())
            plain = RecordDict(
                {
                    k: v
                    for k, v in inner.content.items()
                    if k not in (SECAGG_CONFIGS_KEY, SECAGG_RECORD)
                }
            )
            inner.content = plain
            reply = call_next(inner, ctx)
            if reply.has_error():
                raise _InnerError(reply)
            return _as_fitres(reply, inner, sent, weighting, sa)

        try:
            return secaggplus_mod(msg, context, _train)
        except _InnerError as exc:
            return exc.reply

    return _mod


def _as_fitres(
    reply: Message,
    incoming: Message,
    sent: ArrayRecord,
    weighting: ConfigRecord,
    sa: SecureAggregationConfig,
) -> Message:
    """Add the legacy ``FitRes`` records Flower's mod reads to privet's reply."""
    content = reply.content
    arrays = content.array_records[ARRAYS]
    metrics = content.metric_records[METRICS]
    if list(arrays.keys()) != list(sent.keys()):
        _refuse(incoming, "the reply's arrays differ from the ones the server sent")
    ndarrays = [arrays[k].numpy() for k in sent]
    top = max((float(np.max(np.abs(a))) for a in ndarrays if a.size), default=0.0)
    if top > sa.clipping_range:
        _refuse(
            incoming,
            f"a weight of magnitude {top:.4g} lies outside privacy.secagg.clipping_range = "
            f"{sa.clipping_range:g}; SecAgg+ would clip it and corrupt the sum (raise clipping_range)",
        )
    if bool(weighting.get(UNIFORM_WEIGHTS, False)):
        weight = 1
    else:
        weight = int(float(str(metrics.get(NUM_EXAMPLES, 1))))
        limit = int(float(str(weighting.get(MAX_WEIGHT, weight))))
        if weight > limit:
            # Only the FedAvg weight is capped (a utility matter, not a privacy one): a larger
            # weight would overflow the masked sum's fixed-point range.
            log.warning(
                "SecAgg+: this client's %d examples exceed privacy.secagg.max_weight = %d; its "
                "update is weighted %d",
                weight,
                limit,
                limit,
            )
            weight = limit
    for key, record in legacy_fit_records(ndarrays, weight=weight).items():
        content[key] = record
    return reply


def _refuse(incoming: Message, reason: str) -> NoReturn:
    raise _InnerError(Message(Error(code=ERROR_SECAGG_REQUIRED, reason=reason), reply_to=incoming))
