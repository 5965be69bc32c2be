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


def _run_task(
    address: str, token: str, app: ClientApp, on_done: Callable[[Message, Message], None]
) -> None:
    """Flower's ``run_clientapp`` minus bundle install and app loading: our app, this process."""
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    client = _runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))  # type: ignore[arg-type]
    heartbeat.start()
    context: Context | None = None
    status, details = SubStatus.FAILED, "privet ClientApp failed"
    try:
        message, context, _run, _fab = pull_task_input(client)  # type: ignore[arg-type]
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
                    _run_task(address, res.token, app, on_done)
                    continue
            except Exception as exc:  # the SuperNode restarting or gone: report and retry
                on_error(exc)
                log.debug("task loop: %s", exc)
            stop.wait(poll)
    finally:
        client.close()  # type: ignore[attr-defined]
    # Give Flower's background threads (heartbeats) a moment to notice.
    time.sleep(0)
