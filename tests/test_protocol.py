"""The client-server protocol (common/protocol.py): error codes, how the server reads them, and one
spelling of every message key."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message
from flwr.serverapp.strategy import FedAvg

from privet.common import protocol
from privet.common.config import PrivetConfig
from privet.common.protocol import ErrorCode, error_reason, partition_of_reason
from privet.server import RecordingStrategy
from privet.server.rundir.privacy_report import privacy_report

from .flower_fakes import NodesGrid, arrays, instruction, run_identity

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "simulations", "common")
NAMES = ["client-0", "client-1"]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with run_identity():
        yield


def test_error_codes_are_privets_own_and_distinct() -> None:
    codes = [int(c) for c in ErrorCode]
    assert len(set(codes)) == len(codes)
    assert min(codes) > 1000  # Flower's own codes are small numbers
    assert ErrorCode.BUDGET == 1001 and ErrorCode.CLIENT == 1002 and ErrorCode.POLICY == 1007


def test_the_modules_codes_are_the_protocols() -> None:
    from privet.client.app import ERROR_BUDGET, ERROR_CLIENT
    from privet.client.deploy import ERROR_POLICY
    from privet.client.secagg import ERROR_SECAGG_REQUIRED
    from privet.server.secagg import ERROR_SECAGG
    from privet.simulations.faults import ERROR_DROPOUT, ERROR_LATE

    assert (ERROR_BUDGET, ERROR_CLIENT, ERROR_DROPOUT, ERROR_LATE) == (1001, 1002, 1003, 1004)
    assert (ERROR_SECAGG, ERROR_SECAGG_REQUIRED, ERROR_POLICY) == (1005, 1006, 1007)


@pytest.mark.parametrize(
    ("reason", "partition"),
    [("[3] budget spent", 3), ("[0] x", 0), ("[12]", 12), ("no partition", None), ("[a] x", None)],
)
def test_an_error_reason_names_its_partition(reason: str, partition: int | None) -> None:
    assert partition_of_reason(reason) == partition


def test_error_reason_round_trips() -> None:
    assert error_reason(7, "simulated dropout") == "[7] simulated dropout"
    assert partition_of_reason(error_reason(7, "anything [9]")) == 7


def _round_with_error(code: int, reason: str) -> dict[str, object]:
    """Feed one error reply through the server's recording strategy; return privacy.json's row."""
    s = RecordingStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), client_names=NAMES)
    list(s.configure_train(1, arrays({"a": [0.0]}), ConfigRecord({}), NodesGrid([1, 2])))
    msg = Message(Error(code=code, reason=reason), reply_to=instruction(1))
    s.aggregate_train(1, [msg])
    rec = s.current
    assert list(rec.error_codes.values()) == [code]
    assert list(rec.errors.values()) == [reason]
    report = privacy_report(
        PrivetConfig(),
        history=[rec],
        client_names=NAMES,
        examples_per_client={"client-0": 100, "client-1": 100},
        client_level=None,
        stopped=None,
    )
    row: dict[str, object] = report["sample_level"]["clients"]["client-0"]
    return row


@pytest.mark.parametrize("code", list(ErrorCode))
def test_the_server_records_each_code_and_only_the_budget_code_is_a_refusal(
    code: ErrorCode,
) -> None:
    # The reason says "budget" every time: only the code may decide.
    row = _round_with_error(int(code), error_reason(0, "the privacy budget of 4 would be passed"))
    refused = code == ErrorCode.BUDGET
    assert row["budget_refused_rounds"] == ([1] if refused else [])
    assert row["budget_stopped"] is refused


def test_a_budget_refusal_is_known_by_its_code_whatever_its_wording() -> None:
    row = _round_with_error(int(ErrorCode.BUDGET), error_reason(0, "epsilon would pass 4.0"))
    assert row["budget_refused_rounds"] == [1]


def test_an_unknown_code_is_recorded_and_is_no_refusal() -> None:
    row = _round_with_error(42, error_reason(0, "budget"))
    assert row["budget_refused_rounds"] == []


# ---- one spelling of every key --------------------------------------------------------------------

#: Names of variables and attributes that hold a Flower record or a node/run config in privet's code.
_RECORD_HOLDERS = {
    "array_records",
    "metric_records",
    "config_records",
    "content",
    "conf",
    "config",
    "metrics",
    "weighting",
    "node_config",
    "run_config",
}


def _holder(node: ast.expr) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return None


def _record_keys(tree: ast.AST) -> Iterator[str]:
    """String literals used as keys of Flower records (and node/run configs) in one module."""

    def literal(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _holder(node.value) in _RECORD_HOLDERS:
            key = literal(node.slice)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and _holder(node.func.value) in _RECORD_HOLDERS
            and node.args
        ):
            key = literal(node.args[0])
        elif (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], ast.In | ast.NotIn)
            and _holder(node.comparators[0]) in _RECORD_HOLDERS
        ):
            key = literal(node.left)
        elif (
            isinstance(node, ast.Call)
            and _holder(node.func) in ("RecordDict", "MetricRecord", "ConfigRecord", "Context")
            and (node.args or node.keywords)
        ):
            dicts = [a for a in node.args if isinstance(a, ast.Dict)]
            dicts += [k.value for k in node.keywords if isinstance(k.value, ast.Dict)]
            for d in dicts:
                for k in d.keys:
                    if k is not None and (key := literal(k)) is not None:
                        yield key
            continue
        else:
            continue
        if key is not None:
            yield key


def test_no_message_key_is_spelled_out_in_two_packages() -> None:
    where: dict[str, set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path == ROOT / "common" / "protocol.py":
                continue
            for key in _record_keys(ast.parse(path.read_text(), str(path))):
                where[key].add(f"{package}/{path.relative_to(ROOT / package)}")
    repeated = {
        key: sorted(files)
        for key, files in where.items()
        if len({f.split("/")[0] for f in files}) > 1
    }
    assert not repeated, (
        "record keys spelled out in more than one package: name them in privet.common.protocol "
        f"and import them: {repeated}"
    )
    # And none of the protocol's own keys is spelled out anywhere else.
    own = {
        value
        for name in protocol.__all__
        if isinstance(value := getattr(protocol, name), str) and name.isupper()
    }
    spelled = {key: sorted(where[key]) for key in own if key in where}
    assert not spelled, f"use privet.common.protocol's names instead of these literals: {spelled}"
