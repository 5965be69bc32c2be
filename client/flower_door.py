"""The client side's one door into Flower's non-public API (pinned by ``tests/test_flower_doors.py``).

Everything else under ``privet.client`` imports only Flower's public API (``flwr.app``,
``flwr.clientapp``, ``flwr.clientapp.mod``) or this module. Each name below says why the public
API does not serve; when a Flower release moves one of them, the contract tests name the symbol.

Four concerns pass through here:

- **the SuperNode's task runtime** (``client/worker.py`` runs privet's ClientApp in its own
  long-lived process): acquire a task, pull its message, push the reply and the task status;
- **SecAgg+**, which Flower implements only in its legacy API (``client/secagg.py``);
- **the SuperLink's Fleet API**, asked directly by a restarting site to sign off the node its
  killed SuperNode left online (``client/deploy.py``);
- **the SuperNode's log**, where Flower offers no state to ask (admission, refusal, dropped
  messages).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict

# SecAgg+ exists only in Flower's legacy API (FLOWER.md): its client mod, the legacy FitRes
# records that mod reads, and the key of its stage record.
from flwr.client.mod import secaggplus_mod

# A mod's types: ``ClientApp(mods=...)`` takes them, but ``flwr.clientapp`` exports no name for
# them; Flower's own aliases keep privet's mods checked against exactly what ClientApp accepts.
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

__all__ = [
    "HEARTBEAT_DEFAULT_INTERVAL",
    "HEARTBEAT_PATIENCE",
    "SECAGG_CONFIGS_KEY",
    "ClientAppCallable",
    "Mod",
    "ObjectUnavailable",
    "RuntimeClient",
    "acquire_task",
    "admissions",
    "admitted_node_id",
    "deactivate_node",
    "dropped_message",
    "error_reply",
    "legacy_fit_records",
    "pull_task_input",
    "push_reply",
    "push_task_status",
    "refused_activation",
    "refused_as_still_online",
    "runtime_client",
    "secaggplus_mod",
    "task_heartbeat",
]

#: The config record the SecAgg+ workflow adds to each stage's message (legacy constant).
SECAGG_CONFIGS_KEY: str = RECORD_KEY_CONFIGS

# HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE: how long the SuperLink keeps a silent node
# ONLINE (and refuses its key meanwhile); Flower states it only in ``flwr.common.constant``.

#: A client of the SuperNode's local runtime API (Flower's ``RuntimeHttpClient``).
RuntimeClient = Any


# -- the SuperNode's task runtime ------------------------------------------------------------------
# Flower has no public API for running a ClientApp outside its own ``flwr-clientapp`` process:
# these are the steps of its SuperExec + ``flwr-clientapp`` (``flwr.supernode.runtime``), minus
# installing the coordinator's bundle and loading an app from it.


def runtime_client(address: str, token: str | None, *, tries: int = 3) -> RuntimeClient:
    """A client of the SuperNode's runtime API at ``address`` (loopback, no TLS).

    ``token`` is ``None`` for the task loop (acquiring tasks, as Flower's SuperExec does) and the
    task's token for running one task (as ``flwr-clientapp`` does).
    """
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if token is not None:
        interceptors = [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ]
    invoker = make_simple_http_retry_invoker()
    invoker.max_tries = tries  # bounded: the SuperNode is local; a dead one ends the loop
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's runtime API listens on 127.0.0.1 only
        root_certificates=None,
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=invoker,
    )


def acquire_task(client: RuntimeClient) -> str | None:
    """The token of a ClientApp task the SuperNode holds, or ``None`` when it holds none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
    return str(res.token) if res.HasField("task") and res.token else None


def _object_unavailable() -> type[Exception]:
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    return ObjectUnavailableError


class ObjectUnavailable(Exception):  # noqa: N818 (reads as the condition it reports)
    """Raised by :func:`pull_task_input`'s ``on_missing`` hook to keep waiting for an object."""


def pull_task_input(
    client: RuntimeClient,
    *,
    tries: int,
    on_missing: Callable[[str], None] = lambda _message_id: None,
) -> tuple[Message, Context]:
    """Flower's ``pull_task_input`` (the task's context and message), with a bounded wait.

    ``tries`` bounds the tries on each object of the message (Flower's own pull waits up to 2 h);
    ``on_missing(message_id)`` is called each time an object is not there yet and may raise to
    give the task up.
    """
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    # Flower's Message() stamps replies with the task's identity (a class-level singleton).
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    tree = msgs.message_object_trees[0]
    node = Node(node_id=context.node_id)
    pull_one = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
    unavailable = _object_unavailable()

    def pull(object_id: str) -> bytes:
        try:
            return bytes(pull_one(object_id))
        except unavailable:
            on_missing(tree.object_id)
            raise

    message = pull_and_inflate_object_from_tree(
        tree,
        pull,
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_tries_per_object=tries,
    )
    # The message id is private metadata (no setter): Flower's own pull sets it the same way, and
    # the reply's ``reply_to_message_id`` must name it.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context


@contextlib.contextmanager
def task_heartbeat(client: RuntimeClient) -> Iterator[None]:
    """Keep the task alive for the SuperNode while the block runs (Flower's task heartbeat)."""
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    try:
        yield
    finally:
        if heartbeat.is_running:
            heartbeat.stop()


def push_reply(client: RuntimeClient, reply: Message, context: Context) -> None:
    """Hand the reply to the SuperNode (Flower's ``push_message``)."""
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, reply, context)


def push_task_status(
    client: RuntimeClient, context: Context | None, *, ok: bool, details: str
) -> None:
    """End the task with its status and context (Flower's ``push_task_output``)."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_task_output

    push_task_output(client, context, SubStatus.COMPLETED if ok else SubStatus.FAILED, details)


def error_reply(message: Message, exc: BaseException) -> Message:
    """The reply Flower's ``flwr-clientapp`` sends when the ClientApp raised (its error code)."""
    from flwr.common.constant import ErrorCode

    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
        reply_to=message,
    )


# -- SecAgg+ (legacy API only) ------------------------------------------------------------------


def legacy_fit_records(ndarrays: list[np.ndarray], *, weight: int) -> RecordDict:
    """The legacy ``FitRes`` records Flower's ``secaggplus_mod`` reads from a train reply."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(ndarrays),
        num_examples=weight,
        metrics={},
    )
    return fitres_to_recorddict(fitres, keep_input=True)


# -- the SuperLink's Fleet API ------------------------------------------------------------------


def deactivate_node(
    server: str, *, node_id: int, key: Path | None, ca: Path | None, timeout: float = 10.0
) -> bool:
    """Sign off node ``node_id`` at the SuperLink ``server`` as that node (its own key).

    A SuperNode deactivates its node when it ends, but one that was SIGKILLed (a host crash)
    cannot; the SuperLink then keeps the node ONLINE for two missed heartbeats (60 s) and refuses
    its key meanwhile. The Fleet API's ``DeactivateNode`` is what the SuperNode itself would have
    sent; Flower has no public client for it. The request is signed with the node's key, so a site
    can only ever sign off its own node. Returns whether the SuperLink took the node offline
    (``False``: it was not online, or the SuperLink refused).
    """
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    interceptors: list[object] = [RuntimeVersionHttpInterceptor(component_name="SuperNode")]
    if key is not None:
        private = load_ssh_private_key(key.read_bytes(), None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            return False
        interceptors.append(NodeAuthHttpInterceptor(private, private.public_key()))
    invoker = make_simple_http_retry_invoker()
    invoker.max_tries = 1
    invoker.max_time = timeout
    try:
        with FleetHttpClient.from_server_address(
            server,
            ca is None,
            None if ca is None else str(ca),
            interceptors=interceptors,  # type: ignore[arg-type]
            retry_invoker=invoker,
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except (httpx.HTTPError, RuntimeError, OSError):
        return False
    return True


# -- the SuperNode's log: where Flower offers no state to ask -----------------------------------
# flower-supernode's health service says SERVING before the SuperLink activated the node, it has
# no API that says whether (or as which node) it was admitted, why it exited, or that it dropped a
# message; it only logs these. The lines below are Flower 1.41's (flwr/supernode/*.py).

#: ``start_client_internal`` logs this once the SuperLink activated the node.
_ADMITTED = re.compile(r"SuperNode ID: (\d+)")


def admissions(log_text: str) -> int:
    """How many times the SuperNode whose log is ``log_text`` was admitted."""
    return len(_ADMITTED.findall(log_text))


def admitted_node_id(log_text: str) -> int | None:
    """The node id of the last admission in ``log_text`` (``None``: never admitted)."""
    found = _ADMITTED.findall(log_text)
    return int(found[-1]) if found else None


def refused_activation(log_tail: str) -> bool:
    """Whether the SuperNode exited because it could not connect or was not activated (exit 305)."""
    return "Exit Code: 305" in log_tail


def refused_as_still_online(log_tail: str) -> bool:
    """Whether the SuperLink refused to activate the node (Flower: the node is still ONLINE)."""
    return refused_activation(log_tail) and "Failed to activate SuperNode" in log_tail


def dropped_message(log_tail: str, message_id: str) -> bool:
    """Whether the SuperNode logged that it dropped the message ``message_id``.

    Flower logs both ways a received message is dropped ("Run ID ... is not in `RUNNING` status.
    Ignoring message ..." and "Failed to receive message ...") and offers no API to ask.
    """
    return any(
        message_id in line and ("Ignoring message" in line or "Failed to receive" in line)
        for line in log_tail.splitlines()
    )
