"""Contract tests of privet's two doors into Flower's non-public API, against the installed Flower.

``client/flower_door.py`` and ``server/flower_door.py`` hold every use of Flower outside its public
API. These tests run each door path against the Flower installed here and fail with a message
naming the Flower symbol that moved; the last tests keep non-public imports from creeping back
into any other module. ``pyproject.toml`` states the Flower range they were run on.
"""

from __future__ import annotations

import ast
import base64
import importlib
import inspect
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
)

from privet.client import flower_door as client_door
from privet.server import flower_door as server_door
from tests.flower_fakes import NodesGrid, arrays, instruction, reply, run_identity

ROOT = Path(__file__).resolve().parents[1]
DOORS = {ROOT / "client" / "flower_door.py", ROOT / "server" / "flower_door.py"}
#: Flower's public API: these modules, and only the names in their ``__all__``.
PUBLIC = (
    "flwr.app",
    "flwr.clientapp",
    "flwr.clientapp.mod",
    "flwr.serverapp",
    "flwr.serverapp.strategy",
    "flwr.simulation",
)
FLOWER = Path(importlib.import_module("flwr").__file__ or "").parent


def _flower_imports(path: Path) -> Iterator[tuple[str, str | None, int, str]]:
    """(module, name or None, line, enclosing function) of every ``flwr`` import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    owners: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            for inner in ast.walk(node):
                owners.setdefault(id(inner), node.name)
    for node in ast.walk(tree):
        where = owners.get(id(node), "<module>")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            for alias in node.names:
                yield str(node.module), alias.name, node.lineno, where
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flwr":
                    yield alias.name, None, node.lineno, where


# -- every Flower symbol a door names still exists -------------------------------------------------


@pytest.mark.parametrize("door", sorted(DOORS), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_flower_symbol_a_door_uses_exists(door: Path) -> None:
    moved = []
    for module, name, line, where in _flower_imports(door):
        try:
            found = importlib.import_module(module)
            if name is not None:
                getattr(found, name)
        except (ImportError, AttributeError) as exc:
            moved.append(
                f"{module}{'.' + name if name else ''} (used by {door.parent.name}/{door.name}:"
                f"{line} in {where}): {exc}"
            )
    assert not moved, "Flower moved symbols privet's door depends on:\n" + "\n".join(moved)


def _flower_source(relative: str) -> str:
    path = FLOWER / relative
    assert path.is_file(), f"Flower moved {relative} (privet's door reads what it says)"
    return path.read_text(encoding="utf-8")


# -- client door ---------------------------------------------------------------------------------


class _Runtime:
    """The SuperNode's runtime API holding one task whose message is complete in its store."""

    def __init__(self, message: Message, context: Context) -> None:
        from flwr.common.serde import context_to_proto, message_to_proto
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
        )

        self.objects = {k: v.deflate() for k, v in get_all_nested_objects(message).items()}
        self.task = PullTaskInputResponse(context=context_to_proto(context), task_id=9)
        self.task.run.run_id = context.run_id
        self.messages = PullAppMessagesResponse(
            messages_list=[message_to_proto(message)],
            message_object_trees=[get_object_tree(message)],
        )
        self.confirmed = 0
        self.outputs: list[object] = []

    def PullTaskInput(self, _req: object) -> object:  # noqa: N802 (Flower's RPC names)
        return self.task

    def PullMessages(self, _req: object) -> object:  # noqa: N802
        return self.messages

    def PullObject(self, req: object) -> object:  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        content = self.objects[req.object_id]  # type: ignore[attr-defined]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, _req: object) -> object:  # noqa: N802
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse

        self.confirmed += 1
        return ConfirmMessageReceivedResponse()

    def PushTaskOutput(self, req: object) -> object:  # noqa: N802
        self.outputs.append(req)
        return None


def test_pull_task_input_returns_the_message_its_context_and_its_id() -> None:
    with run_identity():
        sent = Message(
            RecordDict({"arrays": arrays({"w": [1.0, 2.0]}), "config": ConfigRecord({"r": 3})}),
            dst_node_id=7,
            message_type="train",
        )
    context = Context(run_id=4, node_id=7, node_config={"k": 1}, state=RecordDict(), run_config={})
    runtime = _Runtime(sent, context)
    message, got = client_door.pull_task_input(runtime, tries=2)
    assert got.node_id == 7 and got.run_id == 4 and dict(got.node_config) == {"k": 1}
    assert message.metadata.message_id == sent.object_id  # the private id is set
    assert message.content.config_records["config"]["r"] == 3
    np.testing.assert_array_equal(message.content.array_records["arrays"]["w"].numpy(), [1.0, 2.0])
    assert runtime.confirmed == 1
    # A reply made now names the task's node and the message it answers.
    answer = Message(RecordDict(), reply_to=message)
    assert answer.metadata.src_node_id == 7
    assert answer.metadata.reply_to_message_id == sent.object_id


def test_a_missing_object_asks_the_hook_and_the_hook_can_give_up() -> None:
    with run_identity():
        sent = Message(RecordDict({"a": arrays({"w": [1.0]})}), dst_node_id=7, message_type="train")
    runtime = _Runtime(sent, Context(1, 7, {}, RecordDict(), {}))
    runtime.objects.clear()  # nothing arrived in the SuperNode's store
    asked: list[str] = []

    class GiveUpError(Exception):
        pass

    def on_missing(message_id: str) -> None:
        asked.append(message_id)
        raise GiveUpError

    with pytest.raises(GiveUpError):
        client_door.pull_task_input(_Unavailable(runtime), tries=5, on_missing=on_missing)
    assert asked == [sent.object_id]


class _Unavailable:
    """The runtime above, answering every object 'not available yet'."""

    def __init__(self, runtime: _Runtime) -> None:
        self.runtime = runtime

    def __getattr__(self, name: str) -> object:
        return getattr(self.runtime, name)

    def PullObject(self, _req: object) -> object:  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        return PullObjectResponse(object_found=True, object_available=False)


def test_runtime_client_speaks_the_runtime_rpcs_the_door_calls() -> None:
    client = client_door.runtime_client("127.0.0.1:9", None)
    try:
        for rpc in (
            "AcquireTask",
            "PullTaskInput",
            "PullMessages",
            "PullObject",
            "ConfirmMessageReceived",
            "PushMessages",
            "PushObject",
            "PushTaskOutput",
        ):
            assert callable(getattr(client, rpc, None)), f"RuntimeHttpClient.{rpc} moved"
    finally:
        client.close()


def test_push_task_status_sends_flowers_sub_status() -> None:
    with run_identity():
        runtime = _Runtime(Message(RecordDict(), dst_node_id=1, message_type="train"), _context())
    client_door.push_task_status(runtime, None, ok=True, details="")
    client_door.push_task_status(runtime, None, ok=False, details="boom")
    from flwr.common.constant import SubStatus

    got = [(o.sub_status, o.details) for o in runtime.outputs]  # type: ignore[attr-defined]
    assert got == [(SubStatus.COMPLETED, ""), (SubStatus.FAILED, "boom")]


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_push_reply_takes_flowers_runtime_client_and_a_context() -> None:
    from flwr.supernode.runtime.run_clientapp import push_message

    params = list(inspect.signature(push_message).parameters)
    assert params == ["client", "message", "context"], f"push_message's signature: {params}"


def test_an_app_that_raised_gets_flowers_error_code() -> None:
    from flwr.common.constant import ErrorCode

    with run_identity():
        msg = instruction(3)
        err = client_door.error_reply(msg, ValueError("bad"))
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert err.error.reason == "ValueError: bad"


def test_legacy_fit_records_round_trip_through_flowers_reader() -> None:
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    sent = [np.arange(3, dtype=np.float32), np.ones((2, 2), dtype=np.float32)]
    fitres = recorddict_to_fitres(client_door.legacy_fit_records(sent, weight=17), keep_input=True)
    assert fitres.num_examples == 17
    for a, b in zip(parameters_to_ndarrays(fitres.parameters), sent, strict=True):
        np.testing.assert_array_equal(a, b)


def test_secagg_stage_record_key_is_the_one_flowers_mod_reads() -> None:
    mod = _flower_source("client/mod/secure_aggregation/secaggplus_mod.py")
    assert "msg.content.config_records[RECORD_KEY_CONFIGS]" in mod
    assert client_door.SECAGG_CONFIGS_KEY == server_door.SECAGG_CONFIGS_KEY


def test_heartbeat_constants_are_the_ones_the_superlink_uses() -> None:
    state = _flower_source("server/superlink/linkstate/sql_linkstate.py")
    assert "HEARTBEAT_PATIENCE * heartbeat_interval" in state, "the SuperLink's liveness rule moved"
    assert client_door.HEARTBEAT_PATIENCE * client_door.HEARTBEAT_DEFAULT_INTERVAL > 0


class _Fleet(BaseHTTPRequestHandler):
    """A SuperLink Fleet route that records what a SuperNode would send it."""

    seen: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    status = 200

    def do_POST(self) -> None:
        from flwr.proto.fleet_pb2 import DeactivateNodeResponse

        body = self.rfile.read(int(self.headers["content-length"]))
        self.seen.append((self.path, dict(self.headers.items()), body))
        payload = DeactivateNodeResponse().SerializeToString()
        self.send_response(self.status)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def fleet() -> Iterator[tuple[str, type[_Fleet]]]:
    handler = type("Handler", (_Fleet,), {"seen": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_deactivate_node_sends_a_request_signed_with_the_nodes_key(
    tmp_path: Path, fleet: tuple[str, type[_Fleet]]
) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.common.constant import TIMESTAMP_HEADER
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest
    from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

    from privet.common.certs import make_node_key

    address, handler = fleet
    key, public = make_node_key("site-a", out=tmp_path)
    assert client_door.deactivate_node(address, node_id=42, key=key, ca=None)
    [(path, headers, body)] = handler.seen
    assert path == "/v1/fleet/deactivate-node"
    request = DeactivateNodeRequest()
    request.ParseFromString(body)
    assert request.node_id == 42
    # What Flower's NodeAuthMiddleware checks: the public key, a timestamp and its signature.
    sent_key = base64.b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER.lower()])
    registered = load_ssh_public_key(public.read_bytes())  # the key the coordinator registered
    assert bytes_to_public_key(sent_key).public_numbers() == registered.public_numbers()  # type: ignore[union-attr]
    assert verify_signature(
        bytes_to_public_key(sent_key),
        headers[TIMESTAMP_HEADER.lower()].encode("ascii"),
        base64.b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER.lower()]),
    )


def test_deactivate_node_says_false_when_the_superlink_refuses(
    tmp_path: Path, fleet: tuple[str, type[_Fleet]]
) -> None:
    from privet.common.certs import make_node_key

    address, handler = fleet
    handler.status = 500
    key, _ = make_node_key("site-a", out=tmp_path)
    assert not client_door.deactivate_node(address, node_id=42, key=key, ca=None)
    assert not client_door.deactivate_node("127.0.0.1:9", node_id=42, key=key, ca=None)


def test_the_fleet_route_the_door_calls_is_the_superlinks() -> None:
    router = _flower_source("superlink/routers/fleet/router.py")
    assert '@router.post("/deactivate-node")' in router
    assert 'prefix="/v1/fleet"' in router or "/v1/fleet" in router


def test_the_supernode_log_lines_the_door_reads_are_flowers() -> None:
    start = _flower_source("supernode/start_client_internal.py")
    assert '"SuperNode ID: %s"' in start, "the SuperNode's admission line changed"
    assert "Ignoring message %s." in start and "Failed to receive message %s" in start
    from flwr.supercore.exit import ExitCode

    assert ExitCode.SUPERNODE_CONNECTION_ERROR == 305
    assert 'f"Exit Code: {code}' in _flower_source("supercore/exit/exit.py")
    assert '"Failed to activate SuperNode."' in _flower_source("supercore/error/catalog.py")
    log = "INFO :      SuperNode ID: 17\nINFO :      x\nINFO :      SuperNode ID: 18\n"
    assert client_door.admissions(log) == 2 and client_door.admitted_node_id(log) == 18
    assert client_door.admitted_node_id("nothing") is None
    refused = "ERROR: Exit Code: 305\n[code: 2004] Failed to activate SuperNode.\n"
    assert client_door.refused_as_still_online(refused)
    assert client_door.refused_activation("Exit Code: 305\nunreachable")
    assert not client_door.refused_as_still_online("Exit Code: 305\nunreachable")
    line = "INFO :      Run ID 4 is not in `RUNNING` status. Ignoring message abc."
    assert client_door.dropped_message(line, "abc") and not client_door.dropped_message(line, "d")


# -- server door ---------------------------------------------------------------------------------


def test_grid_signatures_name_the_types_the_door_exports() -> None:
    from flwr.serverapp import Grid

    assert "NodeInfo" in str(inspect.signature(Grid.get_nodes).return_annotation)
    run = inspect.getattr_static(Grid, "run")
    assert "Run" in str(inspect.signature(run.fget).return_annotation)
    assert "Run" in str(inspect.signature(Grid.set_run).parameters["run"].annotation)


def test_task_identity_stamps_messages_and_is_restored() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    with server_door.task_identity(run_id=5, node_id=0):
        msg = instruction(3)
        assert msg.metadata.run_id == 5 and msg.metadata.src_node_id == 0
        server_door.set_task_node(3)
        answer = Message(RecordDict(), reply_to=msg)
        assert answer.metadata.src_node_id == 3
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before


def test_set_src_node_id_renames_the_sender() -> None:
    with run_identity():
        msg = reply(2, {"w": [1.0]})
    server_door.set_src_node_id(msg, 9)
    assert msg.metadata.src_node_id == 9


@pytest.mark.parametrize(
    "wrapper",
    [server_door.ServerSideAdaptiveClipping, server_door.ClientSideAdaptiveClipping],
)
def test_adaptive_clip_hooks_are_what_flowers_wrapper_calls(wrapper: type) -> None:
    for base in (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyClientSideAdaptiveClipping,
    ):
        for private in ("_add_noise_to_aggregated_arrays", "_geometric_update"):
            assert callable(getattr(base, private, None)), f"{base.__name__}.{private} moved"
    from flwr.supercore.differential_privacy import KEY_NORM_BIT

    calls: list[str] = []

    class Hooked(wrapper):  # type: ignore[misc, valid-type]
        def noise_clip(self) -> float:
            calls.append("noise")
            return 0.0  # noise scaled to a zero clip: none

        def update_clip(self, clipped_fraction: float) -> None:
            calls.append("update")
            self.clipping_norm = 123.0

    fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    strategy = Hooked(fedavg, 1.0, 2, initial_clipping_norm=10.0, clipped_count_stddev=1.0)
    grid = NodesGrid([1, 2])
    with run_identity():
        sent = list(strategy.configure_train(1, arrays({"w": [0.0, 0.0]}), ConfigRecord(), grid))
        assert len(sent) == 2
        replies = [
            reply(n, {"w": w}, extra={KEY_NORM_BIT: 0})
            for n, w in ((1, [0.2, 0.0]), (2, [0.0, 0.4]))
        ]
    out, _ = strategy.aggregate_train(1, replies)
    assert calls == ["update", "noise"]  # Flower moves the clip, then noises with noise_clip()
    assert out is not None  # zero noise: the plain average came back, and the hook's clip stays
    np.testing.assert_allclose(out["w"].numpy(), [0.1, 0.2], atol=1e-6)
    assert strategy.clipping_norm == 123.0
    # By default the hooks do what Flower does: the clip moves.
    plain = wrapper(fedavg, 1.0, 2, initial_clipping_norm=10.0, clipped_count_stddev=1.0)
    plain.update_clip(0.0)
    assert plain.clipping_norm != 10.0 and plain.noise_clip() == plain.clipping_norm


@pytest.mark.parametrize(
    ("strategy", "fields"),
    [
        (FedAdam, ("current_arrays", "m_t", "v_t")),
        (FedYogi, ("current_arrays", "m_t", "v_t")),
        (FedAdagrad, ("current_arrays", "m_t", "v_t")),
        (FedAvgM, ("current_arrays", "momentum_vector")),
    ],
)
def test_flower_state_fields_are_attributes_of_flowers_strategies(
    strategy: type, fields: tuple[str, ...]
) -> None:
    instance = strategy()
    assert server_door.flower_state_fields(instance) == fields
    missing = [f for f in fields if f not in vars(instance)]
    assert not missing, f"{strategy.__name__} no longer holds {missing}"


def test_adaptive_dp_wrappers_hold_their_clip() -> None:
    dp = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), 1.0, 2, initial_clipping_norm=0.5, clipped_count_stddev=1.0
    )
    assert server_door.flower_state_fields(dp) == ("clipping_norm",)
    assert dp.clipping_norm == 0.5
    assert server_door.flower_state_fields(FedAvg()) is None


def test_secagg_constants_are_flowers_stage_names() -> None:
    assert server_door.STAGE_MASKED_UPLOAD == "collect_masked_vectors"
    assert server_door.SECAGG_STAGE_KEY == "stage"
    mods = _flower_source("clientapp/mod/centraldp_mods.py")
    assert "KEY_CLIPPING_NORM" in mods, "Flower's clipping mods read the clip elsewhere now"


def test_secaggplus_mean_halts_cleanly_when_nobody_answers() -> None:
    class Nobody:
        def send_and_receive(
            self, messages: object, *, timeout: float | None = None
        ) -> list[object]:
            return []

    with run_identity():
        mean = server_door.secaggplus_mean(
            Nobody(),
            contents={n: RecordDict({"arrays": arrays({"w": [0.0]})}) for n in (1, 2, 3)},
            server_round=1,
            num_shares=1.0,
            reconstruction_threshold=2,
            max_weight=1.0,
            clipping_range=8.0,
            quantization_range=4194304,
            modulus_range=4294967296,
            timeout=1.0,
        )
    assert mean is None  # the full protocol's happy path: tests/test_secagg.py


def test_register_outcome_reads_the_words_flowers_control_api_uses() -> None:
    assert "already" in _flower_source("superlink/servicer/control/control_handlers.py").lower()
    assert server_door.register_outcome(0, "") == "registered"
    assert server_door.register_outcome(1, "Public key already in use") == "registered"
    assert server_door.register_outcome(1, "StatusCode.UNAVAILABLE") == "not yet"
    assert server_door.register_outcome(1, "bad key") == "failed"


# -- no other module imports Flower's non-public API ---------------------------------------------


def _public_names(module: str) -> set[str]:
    return set(getattr(importlib.import_module(module), "__all__", ()))


def test_only_the_doors_import_non_public_flower_api() -> None:
    offending = []
    for folder in ("client", "server", "common", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in DOORS:
                continue
            for module, name, line, _ in _flower_imports(path):
                public = module in PUBLIC and (name is None or name in _public_names(module))
                if not public:
                    what = f"{module}.{name}" if name else module
                    offending.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offending, (
        "non-public Flower API outside client/flower_door.py and server/flower_door.py "
        "(add it to a door, with why the public API does not serve):\n" + "\n".join(offending)
    )


def test_no_module_outside_the_doors_writes_private_metadata() -> None:
    offending = []
    for folder in ("client", "server", "common", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in DOORS:
                continue
            text = path.read_text(encoding="utf-8")
            for marker in ('__dict__["_', "TaskIdentity", "._add_noise_to_", "._geometric_update"):
                if marker in text:
                    offending.append(f"{path.relative_to(ROOT)}: {marker}")
    assert not offending, "Flower internals outside the doors:\n" + "\n".join(offending)


def test_the_scan_catches_a_non_public_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from flwr.app import Message\n"
        "def f():\n    from flwr.supercore.run import Run\n"
        "import flwr.proto.node_pb2\n"
        "from flwr.app import NotPublic\n"
    )
    found = [
        (m, n)
        for m, n, _, _ in _flower_imports(bad)
        if not (m in PUBLIC and (n is None or n in _public_names(m)))
    ]
    assert sorted(found, key=str) == sorted(
        [("flwr.supercore.run", "Run"), ("flwr.proto.node_pb2", None), ("flwr.app", "NotPublic")],
        key=str,
    )
