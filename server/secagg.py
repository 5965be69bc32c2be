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
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

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
from privet.server.loop import WrappedGrid, send_and_receive

__all__ = ["ERROR_SECAGG", "SecAggGrid"]

log = logging.getLogger("privet")

#: Error code of a client left out of a round because secure aggregation halted.
ERROR_SECAGG = int(ErrorCode.SECAGG)


class _SumOnly(LegacyStrategy):
    """The legacy strategy the workflow drives: it samples nobody and keeps the unmasked mean.

    The clients are chosen by privet's Message-API strategy before the workflow starts
    (:meth:`configure_fit` returns exactly those); :meth:`aggregate_fit` receives the results whose
    parameters the workflow has already replaced by the unmasked mean, and keeps that mean.
    """

    def __init__(self, proxies: list[ClientProxy]) -> None:
        self.proxies = proxies
        self.mean: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # Empty instructions: privet's own train content replaces them after the setup stage.
        return [(p, FitIns(Parameters(tensors=[], tensor_type=""), {})) for p in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.mean = results[0][1].parameters if results else None
        return self.mean, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


class _Workflow(SecAggPlusWorkflow):
    """Flower's workflow, with privet's per-client train content in the masked-upload stage."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage; then the train instructions become privet's own messages."""
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.contents[nid] for nid in state.nid_to_fitins}
        return bool(ok)


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
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
            self.bytes_sent += _content_bytes(msg.content)
        replies = send_and_receive(self.inner, out, timeout=timeout or self.timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors[node] = reply
                continue
            self.bytes_received += _content_bytes(reply.content)
            if stage == Stage.COLLECT_MASKED_VECTORS:
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


class SecAggGrid(WrappedGrid):
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

    def take_byte_counts(self) -> tuple[int, int]:
        """Bytes sent and received (all SecAgg+ stages) since the last call; resets the counters."""
        out = (self.bytes_sent, self.bytes_received)
        self.bytes_sent = self.bytes_received = 0
        return out

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
        proxies: list[ClientProxy] = [GridClientProxy(n, cast(Grid, None), 0) for n in by_node]
        legacy = _SumOnly(proxies)
        context = LegacyContext(
            Context(
                run_id=0,
                node_id=0,
                node_config={},
                state=RecordDict(
                    {
                        MAIN_CONFIGS_RECORD: ConfigRecord(
                            {WorkflowKey.CURRENT_ROUND: server_round}
                        ),
                        MAIN_PARAMS_RECORD: ArrayRecord(),
                    }
                ),
                run_config={},
            ),
            strategy=legacy,
        )
        if len(messages) < 3:
            reason = (
                f"secure aggregation needs at least 3 clients in a round, {len(messages)} were "
                "sampled; the round aggregates nothing"
            )
            log.warning("round %d: %s", server_round, reason)
            return [_error(m, reason) for m in messages]
        workflow = _Workflow(
            contents,
            # Flower reads a float num_shares as a share of the round: 1.0 is every client.
            num_shares=k if k < len(messages) else 1.0,
            reconstruction_threshold=t,
            max_weight=float(self.max_weight),
            clipping_range=self.sa.clipping_range,
            quantization_range=self.sa.quantization_range,
            modulus_range=self.sa.modulus_range,
            timeout=self.timeout,
        )
        workflow(cast(Grid, stage_grid), context)
        self.bytes_sent += stage_grid.bytes_sent
        self.bytes_received += stage_grid.bytes_received
        contributors = sorted(stage_grid.uploads)
        self.last_contributors = contributors if legacy.mean is not None else []
        replies: list[Message] = []
        if legacy.mean is None:
            reason = (
                f"secure aggregation halted in round {server_round}: fewer than {t} of a client's "
                f"{k} neighbours answered (the round tolerates {k - t} dropouts per neighbourhood)"
            )
            log.warning("%s; the round aggregates nothing", reason)
            for node, msg in by_node.items():
                replies.append(stage_grid.errors.get(node) or _error(msg, reason))
            return replies
        mean = self._to_arrayrecord(legacy.mean, sent)
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
        clip = float(cast(float, conf[KEY_CLIPPING_NORM]))
        slack = quantization_slack(sum(a.numpy().size for a in sent.values()), self.sa)
        if slack >= clip / 2:
            raise ConfigError(
                f"SecAgg+'s quantization error (up to {slack:.3g} in L2 norm) is not small next to "
                f"the client-level clipping norm {clip:.3g}: the noise would not cover it",
                fix="raise privacy.secagg.quantization_range or lower privacy.secagg.clipping_range",
            )
        lowered = ConfigRecord(dict(conf.items()))
        lowered[KEY_CLIPPING_NORM] = clip - slack
        return lowered

    @staticmethod
    def _to_arrayrecord(params: Parameters, like: ArrayRecord) -> ArrayRecord:
        arrays = parameters_to_ndarrays(params)
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
