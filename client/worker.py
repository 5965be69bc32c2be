"""Run privet's ClientApp inside a long-lived process instead of one Flower process per message.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message and loads the
ClientApp named by the coordinator's app bundle from it: the model and tokenizer are loaded again
every round, and the code that runs on the site is whatever the coordinator's bundle names. With
``flower-supernode --isolation process`` the SuperNode leaves task execution to an outside
process; :func:`serve_tasks` is that process's loop (the same steps as Flower's SuperExec plus
``flwr-clientapp``: acquire a task, pull its message, run the app, push the reply and the task
status), but it runs privet's own ClientApp object in this process, so

- the model, tokenizer and tokenized data stay loaded across rounds (the per-process cache in
  ``client/app.py``), and
- a site only ever runs privet's installed client code; the coordinator's bundle is never imported.

Flower offers no public API for this; it uses the runtime client and the pull/push helpers of
``flwr.supernode.runtime.run_clientapp`` (pinned: flwr 1.41).

One change to Flower's steps: the wait for a message's content is bounded. The SuperNode creates
the task *before* it has pulled the message's objects from the coordinator; when the coordinator
dies during that pull, Flower 1.41 drops the message ("Run ID ... is not in `RUNNING` status.
Ignoring message ...") without ending the task, and Flower's own pull waits up to 2 h
(``PULL_MAX_TIME``) for objects that never come. This loop runs one task at a time, so the site
would never run the resumed coordinator's next message (the "hang" of a site during a coordinator
restart). Here the task is given up as soon as ``abandoned(message_id)`` says the SuperNode dropped
the message, and in any case after :data:`OBJECT_TRIES` fruitless tries on one object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

__all__ = ["serve_tasks"]

log = logging.getLogger("privet")


def _runtime_client(address: str, token: str | None) -> object:
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
    invoker.max_tries = 3  # bounded: the SuperNode is local; a dead one ends the loop
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's runtime API listens on 127.0.0.1 only
        root_certificates=None,
        interceptors=interceptors,  # type: ignore[arg-type]
        retry_invoker=invoker,
    )


#: Tries on one object of a message before the task is given up (backoff 1 s doubling to 10 s:
#: about 4.5 min without that object arriving in the SuperNode's store).
OBJECT_TRIES = 30


class TaskAbandonedError(Exception):
    """The SuperNode dropped the message of the task being run (its content will never come)."""


def _pull_task_input(client: object, abandoned: Callable[[str], bool]) -> tuple[Message, Context]:
    """Flower's ``pull_task_input`` with a bounded wait for the message's objects."""
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectUnavailableError,
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())  # type: ignore[attr-defined]
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    msgs = client.PullMessages(PullAppMessagesRequest())  # type: ignore[attr-defined]
    if not msgs.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    tree = msgs.message_object_trees[0]
    node = Node(node_id=context.node_id)
    pull_one = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)  # type: ignore[attr-defined]

    def pull(object_id: str) -> bytes:
        try:
            return pull_one(object_id)
        except ObjectUnavailableError:
            if abandoned(tree.object_id):
                raise TaskAbandonedError(
                    f"the SuperNode dropped message {tree.object_id[:12]}... (its coordinator went "
                    "away while it arrived); waiting for the next one"
                ) from None
            raise

    message = pull_and_inflate_object_from_tree(
        tree,
        pull,
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived,  # type: ignore[attr-defined]
            node,
            context.run_id,
        ),
        return_type=Message,
        max_tries_per_object=OBJECT_TRIES,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context


def _run_task(
    address: str,
    token: str,
    app: ClientApp,
    on_done: Callable[[Message, Message], None],
    abandoned: Callable[[str], bool] = lambda _id: False,
) -> None:
    """Flower's ``run_clientapp`` minus bundle install and app loading: our app, this process."""
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))  # type: ignore[arg-type]
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "privet ClientApp failed"
    try:
        message, context = _pull_task_input(client, abandoned)
        try:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # privet's app replies with errors itself; this is a bug
            log.exception("ClientApp raised")
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(exc).__name__}: {exc}",
                ),
                reply_to=message,
            )
        push_message(client, reply, context)  # type: ignore[arg-type]
        on_done(message, reply)
    finally:
        push_task_output(client, context, status, details)  # type: ignore[arg-type]
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()  # type: ignore[attr-defined]


def serve_tasks(
    address: str,
    app: ClientApp,
    *,
    stop: threading.Event,
    alive: Callable[[], bool],
    on_done: Callable[[Message, Message], None] = lambda _msg, _reply: None,
    on_error: Callable[[BaseException], None] = lambda _exc: None,
    poll: float = 0.2,
    abandoned: Callable[[str], bool] = lambda _message_id: False,
) -> None:
    """Execute the SuperNode's ClientApp tasks with ``app`` until ``stop`` is set or it dies.

    Parameters
    ----------
    address
        The SuperNode's runtime API (``127.0.0.1:PORT``, its ``--port``).
    app
        The ClientApp to run for every message.
    stop
        Set it to end the loop (checked every ``poll`` seconds and after each task).
    alive
        Whether the SuperNode still runs; the loop ends when it does not.
    on_done, on_error
        Called with (message, reply) after each reply is pushed / when a task fails to run.
    poll
        Seconds between asking the SuperNode for a task (it holds a message as soon as one arrives).
    abandoned
        Whether the SuperNode dropped the message with this id (its task is then given up).

    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    client = _runtime_client(address, None)
    try:
        while not stop.is_set() and alive():
            try:
                res = client.AcquireTask(  # type: ignore[attr-defined]
                    AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
                )
                if res.HasField("task") and res.token:
                    _run_task(address, res.token, app, on_done, abandoned)
                    continue
            except Exception as exc:  # the SuperNode restarting or gone: report and retry
                on_error(exc)
                log.debug("task loop: %s", exc)
            stop.wait(poll)
    finally:
        client.close()  # type: ignore[attr-defined]
    # Give Flower's background threads (heartbeats) a moment to notice.
    time.sleep(0)
