"""Secure aggregation (SecAgg+) for privet's Message-API server, on Flower's own implementation.

Flower 1.41 implements SecAgg+ only for its legacy API: ``SecAggPlusWorkflow`` expects a
``LegacyContext`` holding a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit``) and sends
its own four stages of messages.  privet's strategies, DP wrappers and round loop are Message-API
objects, so this module is the one place that speaks the legacy dialect, behind a grid:

:class:`SecAggGrid` wraps the grid the ServerApp got.  Evaluation messages pass through.  The train
messages of a round are not sent as they are: a fresh ``SecAggPlusWorkflow`` runs the protocol
(setup, key sharing, masked upload, unmasking) for exactly the clients the strategy sampled, with
each client's own train content riding along in the masked-upload stage.  The workflow unmasks
only the (weighted) mean of what arrived; every contributing client's reply then carries that mean
instead of its own weights, plus its own metrics (which travel in the clear: loss, epsilon, ...).
A strategy that averages (FedAvg, FedProx, the server optimizers, and privet's client-level DP
with its fixed denominator) computes from those replies exactly what it would have computed from
the individual ones, so nothing above the grid changes.  A client that failed or dropped out
during any stage comes back as an error reply; SecAgg+ recovers its masks from the neighbours'
shares as long as the threshold holds.

The legacy objects never leave this module; the client half is ``privet.client.secagg``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from privet.common.config import SecureAggregationConfig
from privet.common.errors import ConfigError
from privet.common.privacy.secagg import SECAGG_RECORD, quantization_slack
from privet.common.protocol import (
    ARRAYS,
    CONFIG,
    MAX_WEIGHT,
    METRICS,
    SERVER_ROUND,
    UNIFORM_WEIGHTS,
    ErrorCode,
)
from privet.server.flower_door import (
    CLIPPING_NORM_KEY,
    SECAGG_CONFIGS_KEY,
    SECAGG_STAGE_KEY,
    STAGE_MASKED_UPLOAD,
    secaggplus_mean,
)
from privet.server.loop import WrappedGrid, send_and_receive
from privet.server.wrapping import ByteCounts

__all__ = ["ERROR_SECAGG", "SecAggGrid"]

log = logging.getLogger("privet")

#: Error code of a client left out of a round because secure aggregation halted.
ERROR_SECAGG = int(ErrorCode.SECAGG)


class _StageGrid:
    """What the workflow sends through: privet's short-poll delivery, with the replies kept.

    It records, per node, the reply to the masked-upload stage (its metrics are the client's own)
    and the last error reply, and counts the bytes of every stage.
    """

    def __init__(self, inner: Grid, *, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout
        self.uploads: dict[int, Message] = {}
        self.errors: dict[int, Message] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = list(messages)
        stage = ""
        for msg in out:
            stage = str(msg.content.config_records[SECAGG_CONFIGS_KEY].get(SECAGG_STAGE_KEY, ""))
            self.bytes_sent += _content_bytes(msg.content)
        replies = send_and_receive(self.inner, out, timeout=timeout or self.timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors[node] = reply
                continue
            self.bytes_received += _content_bytes(reply.content)
            if stage == STAGE_MASKED_UPLOAD:
                self.uploads[node] = reply
        return replies


def _content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays and of the byte strings (keys, shares, masked vectors) in ``content``."""
    total = sum(rec.count_bytes() for rec in content.array_records.values())
    for rec in content.config_records.values():
        for value in rec.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


class SecAggGrid(ByteCounts, WrappedGrid):
    """Wrap ``inner`` so that each round's train messages run SecAgg+ (see the module docstring).

    Parameters
    ----------
    inner
        The grid Flower gave the ServerApp (or the in-process grid).
    sa
        The ``privacy.secagg`` section.
    uniform_weights
        Weight every client 1 (client-level DP needs it); else by its number of examples.
    max_weight
        The largest weight a client may use when weighting by examples.
    timeout
        Seconds per stage when ``sa.timeout`` is unset.
    client_clipping
        Client-level DP with client-side clipping is on: the clip sent to the clients is lowered by
        the quantization error bound, so that what SecAgg+ adds for a client stays within the clip
        the noise is calibrated to.

    Attributes
    ----------
    bytes_sent, bytes_received
        Bytes of all four stages since the last :meth:`take_byte_counts`.

    """

    #: server/loop.py calls this grid's send_and_receive, which runs the protocol.
    owns_delivery = True

    def __init__(
        self,
        inner: Grid,
        sa: SecureAggregationConfig,
        *,
        uniform_weights: bool,
        max_weight: int,
        timeout: float,
        client_clipping: bool = False,
    ) -> None:
        self.inner = inner
        self.sa = sa
        self.uniform_weights = uniform_weights
        self.max_weight = 1 if uniform_weights else max_weight
        self.timeout = sa.timeout if sa.timeout is not None else timeout
        self.client_clipping = client_clipping
        self.bytes_sent = 0
        self.bytes_received = 0
        #: Clients whose masked update entered the last round's sum.
        self.last_contributors: list[int] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run SecAgg+ for train messages; deliver anything else as it is."""
        out = list(messages)
        if not out or any(m.metadata.message_type != MessageType.TRAIN for m in out):
            return send_and_receive(self.inner, out, timeout=timeout or self.timeout)
        return self._secure_round(out)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        by_node = {m.metadata.dst_node_id: m for m in messages}
        first = messages[0].content
        conf = first.config_records[CONFIG]
        server_round = int(cast(int, conf.get(SERVER_ROUND, 0)))
        sent = first.array_records[ARRAYS]
        self._check_global(sent)
        k, t = self.sa.shares_and_threshold(len(messages))
        contents: dict[int, RecordDict] = {}
        for node, msg in by_node.items():
            # One RecordDict per client (strategies address one content object to many nodes, and
            # the workflow adds its stage record to each).
            content = RecordDict(dict(msg.content.items()))
            if self.client_clipping:
                content[CONFIG] = self._lowered_clip(msg.content.config_records[CONFIG], sent)
            content[SECAGG_RECORD] = ConfigRecord(
                {UNIFORM_WEIGHTS: self.uniform_weights, MAX_WEIGHT: self.max_weight}
            )
            contents[node] = content
        stage_grid = _StageGrid(self.inner, timeout=self.timeout)
        if len(messages) < 3:
            reason = (
                f"secure aggregation needs at least 3 clients in a round, {len(messages)} were "
                "sampled; the round aggregates nothing"
            )
            log.warning("round %d: %s", server_round, reason)
            return [_error(m, reason) for m in messages]
        mean_arrays = secaggplus_mean(
            stage_grid,
            contents=contents,
            server_round=server_round,
            # Flower reads a float num_shares as a share of the round: 1.0 is every client.
            num_shares=k if k < len(messages) else 1.0,
            reconstruction_threshold=t,
            max_weight=float(self.max_weight),
            clipping_range=self.sa.clipping_range,
            quantization_range=self.sa.quantization_range,
            modulus_range=self.sa.modulus_range,
            timeout=self.timeout,
        )
        self.bytes_sent += stage_grid.bytes_sent
        self.bytes_received += stage_grid.bytes_received
        contributors = sorted(stage_grid.uploads)
        self.last_contributors = contributors if mean_arrays is not None else []
        replies: list[Message] = []
        if mean_arrays is None:
            reason = (
                f"secure aggregation halted in round {server_round}: fewer than {t} of a client's "
                f"{k} neighbours answered (the round tolerates {k - t} dropouts per neighbourhood)"
            )
            log.warning("%s; the round aggregates nothing", reason)
            for node, msg in by_node.items():
                replies.append(stage_grid.errors.get(node) or _error(msg, reason))
            return replies
        mean = self._to_arrayrecord(mean_arrays, sent)
        log.info(
            "round %d: SecAgg+ unmasked the sum of %d of %d clients (%d shares, threshold %d)",
            server_round,
            len(contributors),
            len(messages),
            k,
            t,
        )
        for node in by_node:
            upload = stage_grid.uploads.get(node)
            if upload is not None:
                # The client's own metrics (they travel in the clear) with the unmasked mean.
                upload.content = RecordDict(
                    {ARRAYS: mean, METRICS: upload.content.metric_records[METRICS]}
                )
                replies.append(upload)
            elif node in stage_grid.errors:
                replies.append(stage_grid.errors[node])
        return replies

    def _check_global(self, sent: ArrayRecord) -> None:
        r = self.sa.clipping_range
        top = max((float(np.max(np.abs(a.numpy()))) for a in sent.values()), default=0.0)
        if top > r:
            raise ConfigError(
                f"a global weight has magnitude {top:.4g}, outside privacy.secagg.clipping_range "
                f"= {r:g}: SecAgg+ would clip it and the aggregate would be wrong",
                fix=f"set privacy.secagg.clipping_range above {top:.3g}",
            )

    def _lowered_clip(self, conf: ConfigRecord, sent: ArrayRecord) -> ConfigRecord:
        clip = float(cast(float, conf[CLIPPING_NORM_KEY]))
        slack = quantization_slack(sum(a.numpy().size for a in sent.values()), self.sa)
        if slack >= clip / 2:
            raise ConfigError(
                f"SecAgg+'s quantization error (up to {slack:.3g} in L2 norm) is not small next to "
                f"the client-level clipping norm {clip:.3g}: the noise would not cover it",
                fix="raise privacy.secagg.quantization_range or lower privacy.secagg.clipping_range",
            )
        lowered = ConfigRecord(dict(conf.items()))
        lowered[CLIPPING_NORM_KEY] = clip - slack
        return lowered

    @staticmethod
    def _to_arrayrecord(arrays: list[np.ndarray], like: ArrayRecord) -> ArrayRecord:
        if len(arrays) != len(like):
            raise RuntimeError(
                f"SecAgg+ returned {len(arrays)} arrays for {len(like)} trainable arrays"
            )
        out = ArrayRecord()
        for (key, ref), arr in zip(like.items(), arrays, strict=True):
            base = ref.numpy()
            out[key] = Array(np.asarray(arr, dtype=base.dtype).reshape(base.shape))
        return out


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ERROR_SECAGG, reason=reason), reply_to=msg)
