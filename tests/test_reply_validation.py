"""Every train reply is checked before aggregation; bad ones are dropped and counted, the round goes on."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from privet.server import RecordingStrategy, make_reply_checks
from privet.server.validation import update_norm

from .flower_fakes import NodesGrid, arrays, reply, run_identity

NAMES = [f"client-{i}" for i in range(6)]
SENT = {"a": [0.0, 0.0], "b": [[0.0], [0.0]]}


@pytest.fixture(autouse=True)
def _identity():
    with run_identity():
        yield


def _strategy(**kw):
    from flwr.app import ConfigRecord

    checks = make_reply_checks(
        max_update_norm=kw.pop("max_update_norm", 10.0), max_examples={i: 100 for i in range(6)}
    )
    s = RecordingStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1),
        client_names=NAMES,
        checks=checks,
        **kw,
    )
    list(s.configure_train(1, arrays(SENT), ConfigRecord({}), NodesGrid(range(1, 7))))
    return s


def _good(node: int, value: float, n: int = 10):
    return reply(node, {"a": [value, value], "b": [[value], [value]]}, n=n, partition=node - 1)


def test_nan_wrong_shape_oversized_and_lying_replies_are_dropped_and_the_round_completes() -> None:
    s = _strategy()
    replies = [
        _good(1, 1.0),
        _good(2, 3.0),
        reply(3, {"a": [np.nan, 0.0], "b": [[0.0], [0.0]]}, n=10, partition=2),
        reply(4, {"a": [0.0, 0.0, 0.0], "b": [[0.0], [0.0]]}, n=10, partition=3),
        reply(5, {"a": [100.0, 0.0], "b": [[0.0], [0.0]]}, n=10, partition=4),
        reply(6, {"a": [0.0, 0.0], "b": [[0.0], [0.0]]}, n=5000, partition=5),
    ]
    out, _ = s.aggregate_train(1, replies)
    assert out is not None
    # the mean of the two good replies only
    assert out["a"].numpy().tolist() == [2.0, 2.0]
    assert out["b"].numpy().tolist() == [[2.0], [2.0]]
    rec = s.current
    assert rec.aggregated
    assert rec.clients_trained == ["client-0", "client-1"]
    assert set(rec.rejected) == {"client-2", "client-3", "client-4", "client-5"}
    assert "NaN" in rec.rejected["client-2"]
    assert "shape (3,), expected (2,)" in rec.rejected["client-3"]
    assert "update norm 100 exceeds federation.max_update_norm = 10" in rec.rejected["client-4"]
    assert "num-examples = 5000 exceeds the client's 100" in rec.rejected["client-5"]
    assert rec.as_json()["rejected"] == rec.rejected  # goes to metrics.jsonl


@pytest.mark.parametrize(
    ("values", "n", "needle"),
    [
        ({"a": [0.0, 0.0]}, 10, "missing ['b']"),
        ({"a": [0.0, 0.0], "b": [[0.0], [0.0]], "c": [1.0]}, 10, "extra ['c']"),
        ({"a": [0.0, np.inf], "b": [[0.0], [0.0]]}, 10, "NaN or infinite"),
        ({"a": [0.0, 0.0], "b": [[0.0], [0.0]]}, 0, "not a positive whole number"),
        ({"a": [0.0, 0.0], "b": [[0.0], [0.0]]}, 2.5, "not a positive whole number"),
    ],
)
def test_each_kind_of_bad_reply_names_its_reason(values, n, needle: str) -> None:
    s = _strategy()
    s.aggregate_train(1, [_good(1, 1.0), reply(2, values, n=n, partition=1)])  # type: ignore[arg-type]
    assert needle in s.current.rejected["client-1"]


def test_a_wrong_dtype_is_rejected() -> None:
    from flwr.app import Array, ArrayRecord

    s = _strategy()
    bad = ArrayRecord(
        {"a": Array(np.zeros(2, dtype=np.float64)), "b": Array(np.zeros((2, 1), dtype=np.float32))}
    )
    s.aggregate_train(1, [_good(1, 1.0), reply(2, bad, n=10, partition=1)])
    assert "dtype torch.float64, expected torch.float32" in s.current.rejected["client-1"]


def test_too_few_valid_replies_keep_the_global_model() -> None:
    s = _strategy(min_replies=2)
    out, _ = s.aggregate_train(
        1, [_good(1, 1.0), reply(2, {"a": [np.nan, 0.0], "b": [[0.0], [0.0]]}, n=10, partition=1)]
    )
    assert out is None
    assert not s.current.aggregated
    assert list(s.current.rejected) == ["client-1"]


def test_no_norm_bound_by_default() -> None:
    checks = make_reply_checks()
    assert len(checks) == 2
    assert update_norm(arrays({"a": [3.0, 4.0]}), arrays({"a": [0.0, 0.0]})) == 5.0


def test_server_optimizer_output_keeps_the_sent_dtype() -> None:
    """FedAdam computes in float64 (NumPy 2 promotion); the next round must still send float32."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAdam

    s = RecordingStrategy(
        FedAdam(min_train_nodes=1, min_available_nodes=1),
        client_names=NAMES,
        checks=make_reply_checks(),
    )
    list(s.configure_train(1, arrays(SENT), ConfigRecord({}), NodesGrid([1, 2])))
    out, _ = s.aggregate_train(1, [_good(1, 1.0), _good(2, 3.0)])
    assert out is not None
    assert {v.numpy().dtype for v in out.values()} == {np.dtype(np.float32)}
    # round 2 from FedAdam's output: the honest float32 replies pass every check
    list(s.configure_train(2, out, ConfigRecord({}), NodesGrid([1, 2])))
    s.aggregate_train(2, [_good(1, 1.0), _good(2, 3.0)])
    assert s.current.rejected == {}


def test_a_round_a_client_was_charged_for_again_is_recorded() -> None:
    s = _strategy()
    values = {"a": [1.0, 1.0], "b": [[1.0], [1.0]]}
    again = reply(2, values, n=10, partition=1, extra={"epsilon": 1.5, "privacy-attempt": 2})
    once = reply(1, values, n=10, partition=0, extra={"epsilon": 1.0, "privacy-attempt": 1})
    s.aggregate_train(1, [once, again])
    assert s.current.charged_again == {"client-1": 2}
    assert s.current.epsilon_per_client == {"client-0": 1.0, "client-1": 1.5}


class _NamedNodesGrid(NodesGrid):
    """A deployed SuperLink's view: node 1 was registered as "site-a", node 2 without a name."""

    def get_nodes(self):  # type: ignore[no-untyped-def,override]
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=1, name="site-a"), NodeInfo(node_id=2)]


def test_deployed_sites_are_named_by_their_registered_keys() -> None:
    from flwr.app import ConfigRecord, Error, Message

    s = RecordingStrategy(FedAvg(min_train_nodes=1, min_available_nodes=1), client_names=NAMES)
    list(s.configure_train(1, arrays(SENT), ConfigRecord({}), _NamedNodesGrid([1, 2, 3])))
    values = {"a": [1.0, 1.0], "b": [[1.0], [1.0]]}
    failed = Message(Error(code=1, reason="boom"), reply_to=_ins(3))
    s.aggregate_train(
        1,
        [
            reply(1, values, extra={"epsilon": 2.0}),
            reply(2, values, extra={"epsilon": 0.0}),
            failed,
        ],
    )
    # no partition-id metric (a deployed site): the registered name, else the node id
    assert s.current.clients_trained == ["site-a", "node-2"]
    assert s.current.epsilon_per_client["site-a"] == 2.0
    assert s.current.errors == {"node-3": "boom"}
    # a grid that cannot list nodes (the in-process engine) leaves the names as they were
    list(s.configure_train(2, arrays(SENT), ConfigRecord({}), NodesGrid([1, 2])))
    assert s.name_of(None, 1) == "site-a"


def _ins(node: int):  # type: ignore[no-untyped-def]
    from .flower_fakes import instruction

    return instruction(node)


def test_a_simulated_node_is_named_by_the_client_it_reported_playing() -> None:
    s = _strategy()
    assert s.name_of(None, 3) == "node-3"  # nothing known before its first reply
    s.aggregate_train(1, [_good(3, 1.0)])  # node 3 played partition 2
    # later lines about that node (the "still waiting" notes) use the client's name
    assert s.name_of(None, 3) == "client-2"
    assert s.name_of(None, 4) == "node-4"


# --- bounded replies (issue 13): one site cannot outvote the rest --------------------------------


def test_an_outlier_is_judged_against_the_median_of_the_others() -> None:
    from privet.server.validation import norm_outliers

    # two sites: the 1000x one is compared with the honest one and dropped; the honest one stays
    reasons = norm_outliers([1.771, 1771.0], factor=10.0)
    assert reasons[0] is None
    assert reasons[1] is not None and "1771" in reasons[1] and "1.771" in reasons[1]
    # exactly at the bound is kept; just over it is not
    assert norm_outliers([1.0, 10.0], factor=10.0) == [None, None]
    assert norm_outliers([1.0, 10.01], factor=10.0)[1] is not None
    # one reply has nothing to compare with
    assert norm_outliers([1e9], factor=10.0) == [None]
    # the median of the others, not their mean: one huge peer does not lift the bound
    out = norm_outliers([1.0, 1.0, 1.0, 50.0], factor=10.0)
    assert out[:3] == [None, None, None] and out[3] is not None


def test_a_scaled_update_with_a_huge_num_examples_is_dropped_and_the_rest_aggregated() -> None:
    from flwr.app import ConfigRecord

    from privet.server.validation import make_round_checks

    s = RecordingStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1),
        client_names=NAMES,
        checks=make_reply_checks(max_per_client=100_000),
        round_checks=make_round_checks(norm_factor=10.0),
        min_replies=2,
    )
    list(s.configure_train(1, arrays(SENT), ConfigRecord({}), NodesGrid(range(1, 5))))
    scaled = reply(3, {"a": [1000.0, 1000.0], "b": [[1000.0], [1000.0]]}, n=10, partition=2)
    huge = reply(4, {"a": [1.0, 1.0], "b": [[1.0], [1.0]]}, n=10**9, partition=3)
    out, _ = s.aggregate_train(1, [_good(1, 1.0), _good(2, 3.0), scaled, huge])
    assert out is not None and out["a"].numpy().tolist() == [2.0, 2.0]
    assert "update_norm_factor" in s.current.rejected["client-2"]
    assert "max_examples_per_client = 100000" in s.current.rejected["client-3"]
    assert s.current.clients_trained == ["client-0", "client-1"]


def test_the_norm_bound_is_on_by_default_in_a_deployment_only() -> None:
    from privet.common.config import FederationConfig, load_config

    fed = FederationConfig()
    assert fed.norm_factor(deployed=True) == 10.0
    assert fed.norm_factor(deployed=False) is None
    assert FederationConfig(update_norm_factor=3.0).norm_factor(deployed=False) == 3.0
    assert FederationConfig(update_norm_factor=None).norm_factor(deployed=True) is None
    assert fed.max_examples_per_client == 100_000
    with pytest.raises(Exception, match="update_norm_factor"):
        load_config(None, ["federation.update_norm_factor=0.5"])


def test_fewer_valid_replies_than_min_train_clients_skip_the_round_with_a_reason() -> None:
    s = _strategy(min_replies=2)
    out, _ = s.aggregate_train(1, [_good(1, 1.0)])
    assert out is None
    assert s.current.aggregated is False
    assert s.current.skipped is not None
    assert "1 valid train replies, fewer than the 2 needed" in s.current.skipped
    assert "min_train_clients" in s.current.skipped
    assert "skipped" in s.current.as_json()


def test_a_name_never_trains_twice_in_a_round() -> None:
    s = _strategy()
    # two nodes both claim partition 0 (a simulation names by the reported partition)
    out, _ = s.aggregate_train(
        1, [_good(1, 1.0), reply(2, {"a": [3.0, 3.0], "b": [[3.0], [3.0]]}, n=10, partition=0)]
    )
    assert s.current.clients_trained == ["client-0"]
    assert "second reply under the name 'client-0'" in s.current.rejected["client-0"]
    assert out is not None and out["a"].numpy().tolist() == [1.0, 1.0]


def test_a_deployed_site_is_never_named_by_the_partition_it_reports() -> None:
    from flwr.app import ConfigRecord

    s = RecordingStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1), client_names=NAMES, deployed=True
    )
    list(s.configure_train(1, arrays(SENT), ConfigRecord({}), _NamedNodesGrid([1, 2])))
    values = {"a": [1.0, 1.0], "b": [[1.0], [1.0]]}
    s.aggregate_train(1, [reply(1, values, partition=0), reply(2, values, partition=0)])
    # node 2 claims to play client-0; it is named by its (unnamed) key instead
    assert s.current.clients_trained == ["site-a", "node-2"]


def test_a_deployed_site_that_fails_is_named_by_its_key_even_if_it_joined_late() -> None:
    from flwr.app import ConfigRecord, Error, Message
    from flwr.proto.node_pb2 import NodeInfo

    known = [NodeInfo(node_id=1, name="site-a")]

    class _Late(NodesGrid):
        def get_nodes(self):  # type: ignore[no-untyped-def,override]
            return list(known)

    grid = _Late([1, 3])
    s = RecordingStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1), client_names=NAMES, deployed=True
    )
    list(s.configure_train(1, arrays(SENT), ConfigRecord({}), grid))
    known.append(NodeInfo(node_id=3, name="site-c"))  # listed after the round began
    s.aggregate_train(1, [Message(Error(code=1, reason="boom"), reply_to=_ins(3))])
    assert s.current.errors == {"site-c": "boom"}
