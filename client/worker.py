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

Flower offers no public API for this; the runtime client and the pull/push steps are behind
``client/flower_door.py`` (pinned: flwr 1.41, checked by ``tests/test_flower_doors.py``).

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

from privet.client import flower_door as door

__all__ = ["serve_tasks"]

log = logging.getLogger("privet")


#: Tries on one object of a message before the task is given up (backoff 1 s doubling to 10 s:
#: about 4.5 min without that object arriving in the SuperNode's store).
OBJECT_TRIES = 30


class TaskAbandonedError(Exception):
    """The SuperNode dropped the message of the task being run (its content will never come)."""


def _pull_task_input(client: object, abandoned: Callable[[str], bool]) -> tuple[Message, Context]:
    """Flower's ``pull_task_input`` with a bounded wait for the message's objects."""

    def on_missing(message_id: str) -> None:
        if abandoned(message_id):
            raise TaskAbandonedError(
                f"the SuperNode dropped message {message_id[:12]}... (its coordinator went "
                "away while it arrived); waiting for the next one"
            ) from None

    return door.pull_task_input(client, tries=OBJECT_TRIES, on_missing=on_missing)


def _run_task(
    address: str,
    token: str,
    app: ClientApp,
    on_done: Callable[[Message, Message], None],
    abandoned: Callable[[str], bool] = lambda _id: False,
) -> None:
    """Flower's ``run_clientapp`` minus bundle install and app loading: our app, this process."""
    client = door.runtime_client(address, token)
    context: Context | None = None
    ok, details = False, "privet ClientApp failed"
    try:
        # The heartbeat runs until the task's status is pushed (as in Flower's flwr-clientapp).
        with door.task_heartbeat(client):
            try:
                message, context = _pull_task_input(client, abandoned)
                try:
                    reply = app(message=message, context=context)
                    ok, details = True, ""
                except Exception as exc:  # privet's app replies with errors itself; a bug
                    log.exception("ClientApp raised")
                    reply = door.error_reply(message, exc)
                door.push_reply(client, reply, context)
                on_done(message, reply)
            finally:
                door.push_task_status(client, context, ok=ok, details=details)
    finally:
        client.close()


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
    client = door.runtime_client(address, None)
    try:
        while not stop.is_set() and alive():
            try:
                token = door.acquire_task(client)
                if token is not None:
                    _run_task(address, token, app, on_done, abandoned)
                    continue
            except Exception as exc:  # the SuperNode restarting or gone: report and retry
                on_error(exc)
                log.debug("task loop: %s", exc)
            stop.wait(poll)
    finally:
        client.close()
    # Give Flower's background threads (heartbeats) a moment to notice.
    time.sleep(0)
