"""Encode what the server sends and decode what comes back (``federation.transport``).

A thin :class:`~flwr.serverapp.Grid` wrapper: the strategy, the reply checks and the aggregation
all see float32 weights, only the wire carries float16 or int8 (see :mod:`privet.common.transport`).
Flower has no such hook on the server side, hence our own wrapper; it also counts the bytes that
actually travel.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from privet.common.arrays import arrayrecord_to_state
from privet.common.errors import UpdateError
from privet.common.protocol import ARRAYS
from privet.common.transport import (
    TRANSPORT_RECORD,
    Encoding,
    decode_state,
    encode_state,
    read_arrays,
    write_arrays,
)
from privet.server.loop import WrappedGrid, send_and_receive
from privet.server.wrapping import ByteCounts

__all__ = ["TransportGrid"]


class TransportGrid(ByteCounts, WrappedGrid):
    """Wrap ``inner`` so that arrays travel in ``encoding`` both ways.

    Parameters
    ----------
    inner
        The grid Flower gave the ServerApp.
    encoding
        ``float16`` or ``int8`` (``float32`` needs no wrapper).

    Attributes
    ----------
    bytes_sent, bytes_received
        Bytes of the encoded train arrays since the last :meth:`take_byte_counts`.

    """

    #: server/loop.py calls this grid's send_and_receive, which encodes and decodes.
    owns_delivery = True

    def __init__(self, inner: Grid, encoding: Encoding) -> None:
        self.inner = inner
        self.encoding = encoding

    # -- what changes: encode on the way out, decode on the way back ------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Encode the arrays of ``messages``, send them, and decode the replies' arrays."""
        sent: dict[int, dict[str, torch.Tensor]] = {}
        # Strategies build one content object and address it to many nodes: encode each distinct
        # ArrayRecord once and give every message its own RecordDict (never re-encode in place).
        encoded_by_id: dict[int, tuple[RecordDict, dict[str, torch.Tensor]]] = {}
        out = []
        for msg in messages:
            arrays = msg.content.array_records.get(ARRAYS)
            if arrays is not None:
                if id(arrays) not in encoded_by_id:
                    wire_part = RecordDict()
                    write_arrays(wire_part, arrayrecord_to_state(arrays), self.encoding)
                    decoded = decode_state(wire_part.array_records[ARRAYS], self.encoding)
                    encoded_by_id[id(arrays)] = (wire_part, decoded)
                wire_part, decoded = encoded_by_id[id(arrays)]
                content = RecordDict(dict(msg.content.items()))
                content[ARRAYS] = wire_part.array_records[ARRAYS]
                content[TRANSPORT_RECORD] = wire_part.config_records[TRANSPORT_RECORD]
                msg.content = content
                # What the client will decode: its update is relative to exactly this.
                sent[msg.metadata.dst_node_id] = decoded
                if msg.metadata.message_type == "train":
                    self.bytes_sent += content.array_records[ARRAYS].count_bytes()
            out.append(msg)
        # privet's short-poll delivery on the wrapped grid (server/loop.py)
        replies = send_and_receive(self.inner, out, timeout=timeout or 3600.0)
        for reply in replies:
            if reply.has_error() or ARRAYS not in reply.content.array_records:
                continue
            self.bytes_received += reply.content.array_records[ARRAYS].count_bytes()
            try:
                state = read_arrays(reply.content, reference=sent.get(reply.metadata.src_node_id))
            except UpdateError:
                # Leave the reply as it came: the reply checks (or the strategy) reject it.
                continue
            reply.content[ARRAYS] = encode_state(state, "float32")
            del reply.content[TRANSPORT_RECORD]
        return replies
