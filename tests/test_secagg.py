"""Secure aggregation: Flower's SecAgg+ behind privet's grid wrapper and client mod.

The protocol tests use hand-made weights and a ClientApp without a model (milliseconds of crypto);
one in-process federation checks the composition with both DP levels on the tiny MiniLM cut.
"""

from __future__ import annotations

import json
import math
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid

from privet.client.secagg import ERROR_SECAGG_REQUIRED, secagg_mod
from privet.common.config import SecureAggregationConfig, load_config
from privet.common.errors import ConfigError
from privet.server.secagg import ERROR_SECAGG, SecAggGrid
from privet.simulations.inprocess import InProcessGrid, _task_identity

NODES = [1, 2, 3, 4]
_rng = np.random.default_rng(7)
GLOBAL = {
    "a": _rng.normal(0, 0.1, (3, 4)).astype(np.float32),
    "b": _rng.normal(0, 0.1, (5,)).astype(np.float32),
}
# Each client's new weights: the global ones plus its own update.
WEIGHTS = {
    n: {k: (v + _rng.normal(0, 0.02, v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
    for n in NODES
}
EXAMPLES = {1: 10, 2: 20, 3: 30, 4: 40}
SA = SecureAggregationConfig()
STEP = 2 * SA.clipping_range / SA.quantization_range  # one quantization level


class _Spy:
    """Sits between SecAgg+ and the clients: keeps every reply exactly as the server receives it."""

    owns_delivery = True

    def __init__(self, inner: InProcessGrid) -> None:
        self.inner = inner
        #: (sender, the reply's records as they arrived) for every successful reply.
        self.received: list[tuple[int, RecordDict]] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = self.inner.send_and_receive(messages, timeout=timeout)
        for r in replies:
            if not r.has_error():
                self.received.append((r.metadata.src_node_id, RecordDict(dict(r.content.items()))))
        return replies

    def get_node_ids(self) -> list[int]:
        return self.inner.get_node_ids()


def _client_app(
    *, drop: frozenset[int] = frozenset(), required: bool = True, seen: list[Any] | None = None
) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secagg_mod(required=required, sa=SA)])
    def _train(msg: Message, context: Context) -> Message:
        node = context.node_id
        if seen is not None:
            seen.append(msg.content.config_records)
        if node in drop:
            return Message(Error(code=1003, reason="dropped out"), reply_to=msg)
        arrays = ArrayRecord({k: Array(v) for k, v in WEIGHTS[node].items()})
        metrics = MetricRecord({"num-examples": EXAMPLES[node], "epsilon": 0.5 * node})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def _train_messages(config: dict[str, Any] | None = None) -> list[Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    conf = ConfigRecord({"server-round": 1, **(config or {})})
    content = RecordDict({"arrays": arrays, "config": conf})
    # One content object for all nodes, as Flower's strategies do.
    return [Message(content, dst_node_id=n, message_type="train") for n in NODES]


def _round(
    *,
    uniform: bool,
    drop: frozenset[int] = frozenset(),
    seen: list[Any] | None = None,
    client_clipping: bool = False,
    config: dict[str, Any] | None = None,
) -> tuple[list[Message], _Spy]:
    with _task_identity(run_id=1):
        spy = _Spy(InProcessGrid(_client_app(drop=drop, seen=seen), num_nodes=len(NODES)))
        grid = _secagg_grid(spy, uniform=uniform, client_clipping=client_clipping)
        replies = list(grid.send_and_receive(_train_messages(config)))
    return replies, spy


def _secagg_grid(spy: _Spy, *, uniform: bool, client_clipping: bool = False) -> SecAggGrid:
    return SecAggGrid(
        cast(Grid, spy),
        SA,
        uniform_weights=uniform,
        max_weight=100,
        timeout=10.0,
        client_clipping=client_clipping,
    )


def _mean(nodes: list[int], weights: dict[int, float]) -> dict[str, np.ndarray]:
    total = sum(weights[n] for n in nodes)
    return {
        k: sum(weights[n] * WEIGHTS[n][k].astype(np.float64) for n in nodes) / total for k in GLOBAL
    }


def _protocol_weights(examples: dict[int, int], max_weight: int) -> dict[int, float]:
    """The weights SecAgg+ really applies: ``n / max_weight`` rounded to a multiple of 1/range.

    Flower's client mod multiplies its weights by ``round(n / max_weight * R) / R`` (R, the
    quantization range) and sends that factor's integer beside them; the server divides the sum by
    the sum of those factors. They differ from ``n / max_weight`` by at most ``1 / (2R)``.
    """
    r = SA.quantization_range
    return {n: round(examples[n] / max_weight * r) / r for n in examples}


def _error_bound(weights: dict[int, float], nodes: list[int]) -> float:
    """Largest possible per-weight error of the unmasked mean, derived from Flower's algebra.

    Client i sends ``SR((w_i x_i + c) / s)`` (s = one level, c = the clipping range, SR stochastic
    rounding, which moves a value by less than one level: ``|e_i| < 1``). The server's unmasked sum,
    dequantized and shifted by ``k c``, is ``sum_i w_i x_i + s sum_i e_i``; divided by ``W = sum_i
    w_i`` it is the weighted mean plus ``s sum_i e_i / W``. So every weight of the mean is off by
    less than ``k s / W`` (k contributors), for every draw of the rounding: a bound, not a tail.
    The float32 result adds a relative 2**-24, far below one level here.
    """
    return len(nodes) * STEP / sum(weights[n] for n in nodes)


def test_the_server_gets_the_weighted_mean_and_never_a_single_update() -> None:
    replies, spy = _round(uniform=False)

    weights = _protocol_weights(EXAMPLES, max_weight=100)
    expected = _mean(NODES, weights)
    bound = _error_bound(weights, NODES)
    assert bound == pytest.approx(4 * STEP, rel=1e-6)  # W = (10+20+30+40)/100 = 1
    assert sorted(r.metadata.src_node_id for r in replies) == NODES
    for reply in replies:
        assert not reply.has_error()
        got = reply.content.array_records["arrays"]
        for k, v in expected.items():
            assert got[k].numpy().dtype == np.float32
            np.testing.assert_allclose(got[k].numpy(), v, atol=bound, rtol=2**-23)
        # and the mean is the example-weighted one, not the plain one (they differ by ~100 levels)
        unweighted = _mean(NODES, dict.fromkeys(NODES, 1.0))
        assert np.max(np.abs(got["a"].numpy() - unweighted["a"])) > 10 * bound
        # each client's own metrics still reach the server (they travel in the clear)
        node = reply.metadata.src_node_id
        assert reply.content.metric_records["metrics"]["epsilon"] == 0.5 * node

    uploads = [(n, c) for n, c in spy.received if Key.MASKED_PARAMETERS in _secagg(c)]
    assert len(uploads) == len(NODES)
    for _, content in spy.received:  # no reply of any stage carries a weight in the clear
        assert all(len(rec) == 0 for rec in content.array_records.values())
    for node, content in uploads:
        masked = [
            bytes_to_ndarray(b) for b in cast(list[bytes], _secagg(content)[Key.MASKED_PARAMETERS])
        ]
        own = WEIGHTS[node]["a"].astype(np.float64) * EXAMPLES[node] / 100
        plain = (own + SA.clipping_range) / STEP  # what the client would send unmasked
        # The masked vector is uniform modulo 2**32: almost never within 2**20 of the plain one.
        assert np.mean(np.abs(masked[1].astype(np.float64) - plain) > 2**20) > 0.8


def _secagg(content: RecordDict) -> ConfigRecord:
    return content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord())


def test_a_dropout_within_the_threshold_does_not_stop_the_round() -> None:
    replies, _ = _round(uniform=True, drop=frozenset({2}))

    ok = [r for r in replies if not r.has_error()]
    assert sorted(r.metadata.src_node_id for r in ok) == [1, 3, 4]
    (failed,) = [r for r in replies if r.has_error()]
    assert failed.metadata.src_node_id == 2 and failed.error.code == 1003
    weights = _protocol_weights(dict.fromkeys(NODES, 1), max_weight=1)
    expected = _mean([1, 3, 4], weights)
    bound = _error_bound(weights, [1, 3, 4])
    assert bound == pytest.approx(STEP)  # uniform weights: k levels over W = k
    for reply in ok:
        for k, v in expected.items():
            got = reply.content.array_records["arrays"][k].numpy()
            np.testing.assert_allclose(got, v, atol=bound, rtol=2**-23)


class _Crash(_Spy):
    """A node that dies at ``stage`` (as a SIGKILLed SuperNode): from then on, no reply at all.

    In deployment a dead client does not answer with an error; the server's wait for it times out.
    """

    def __init__(self, inner: InProcessGrid, *, node: int, stage: str) -> None:
        super().__init__(inner)
        self.node, self.stage, self.dead = node, stage, False

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stages = {_secagg(m.content).get(Key.STAGE) for m in messages}
        self.dead = self.dead or self.stage in stages
        if self.dead:
            messages = [m for m in messages if m.metadata.dst_node_id != self.node]
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize(
    ("stage", "contributors"),
    [
        # dies before uploading: its pairwise masks are rebuilt from its neighbours' shares
        ("collect_masked_vectors", [1, 3, 4]),
        # dies after uploading: its masked vector is in the sum, its own mask is removed from
        # the shares the others hold, so its update still counts
        ("unmask", [1, 2, 3, 4]),
    ],
)
def test_a_client_that_dies_without_a_word_is_survived(stage: str, contributors: list[int]) -> None:
    with _task_identity(run_id=1):
        crash = _Crash(InProcessGrid(_client_app(), num_nodes=len(NODES)), node=2, stage=stage)
        grid = _secagg_grid(crash, uniform=True)
        replies = list(grid.send_and_receive(_train_messages()))
    assert grid.last_contributors == contributors
    weights = _protocol_weights(dict.fromkeys(NODES, 1), max_weight=1)
    expected = _mean(contributors, weights)
    bound = _error_bound(weights, contributors)
    ok = [r for r in replies if not r.has_error()]
    # a client whose masked upload is in the sum keeps its reply (its examples weigh the round)
    assert sorted(r.metadata.src_node_id for r in ok) == contributors
    for reply in ok:
        for k, v in expected.items():
            got = reply.content.array_records["arrays"][k].numpy()
            np.testing.assert_allclose(got, v, atol=bound, rtol=2**-23)


def test_more_dropouts_than_the_threshold_allows_halt_the_round_with_the_reason() -> None:
    # 4 clients: 4 shares, threshold 3, so one dropout is tolerated, two are not.
    replies, _ = _round(uniform=True, drop=frozenset({2, 3}))
    assert all(r.has_error() for r in replies)
    halted = [r for r in replies if r.error.code == ERROR_SECAGG]
    assert sorted(r.metadata.src_node_id for r in halted) == [1, 4]
    assert "tolerates 1 dropouts" in halted[0].error.reason


def test_the_client_clip_is_lowered_by_the_quantization_error_bound() -> None:
    seen: list[Any] = []
    _round(uniform=True, seen=seen, client_clipping=True, config={"clipping_norm": 0.05})
    params = sum(v.size for v in GLOBAL.values())
    lowered = 0.05 - math.sqrt(params) * STEP
    assert len(seen) == len(NODES)
    for records in seen:  # the train function (and Flower's clipping mod) see one config record
        assert list(records) == ["config"]
        assert records["config"]["clipping_norm"] == pytest.approx(lowered, rel=1e-12)


def test_a_client_that_requires_secure_aggregation_refuses_a_plain_train_message() -> None:
    with _task_identity(run_id=1):
        msg = _train_messages()[0]
        refused = _client_app(required=True)(msg, Context(1, 1, {}, RecordDict(), {}))
        msg = _train_messages()[0]
        plain = _client_app(required=False)(msg, Context(1, 1, {}, RecordDict(), {}))
    assert refused.has_error() and refused.error.code == ERROR_SECAGG_REQUIRED
    assert not plain.has_error() and "arrays" in plain.content.array_records


BASE = [
    "data.num_clients=4",
    "privacy.secure_aggregation=true",
    "federation.min_train_clients=4",
]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["privacy.client_level.enabled=true", "privacy.client_level.noise_multiplier=1.0"],
            "side = 'server' cannot be combined",
        ),
        (
            [
                "privacy.client_level.enabled=true",
                "privacy.client_level.noise_multiplier=1.0",
                "privacy.client_level.side='client'",
                "privacy.client_level.clipping='adaptive'",
            ],
            "'adaptive' cannot be combined",
        ),
        (["federation.strategy='fedmedian'"], "sees only the sum"),
        (["adapter.freeze_a=false", "aggregation.lora='svd'"], "'svd' cannot be combined"),
        (["federation.max_update_norm=1.0"], "max_update_norm cannot be combined"),
        (["federation.transport='int8'"], "transport = 'int8' cannot be combined"),
        (["faults.byzantine_fraction=0.25"], "byzantine_fraction cannot be combined"),
        (
            ["federation.min_train_clients=2", "federation.fraction_train=0.5"],
            "at least 3 clients per round",
        ),
        (["privacy.secagg.num_shares=5"], "num_shares \\(5\\) exceeds the 4 clients"),
        (["privacy.secagg.reconstruction_threshold=2"], "must be above 2 and below 4"),
        (["privacy.secagg.reconstruction_threshold=4"], "must be above 2 and below 4"),
        (
            ["privacy.secagg.quantization_range=2147483648"],
            "the masked sum would wrap around",
        ),
        (["privacy.secagg.modulus_range=3000000000"], "must be a power of two"),
        (
            ["privacy.secagg.num_shares=5", "privacy.secagg.reconstruction_threshold=2"],
            "must exceed num_shares / 2",
        ),
    ],
)
def test_combinations_that_cannot_hold_are_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*BASE, *overrides])


def test_the_shares_and_threshold_follow_the_round() -> None:
    assert SecureAggregationConfig().shares_and_threshold(4) == (4, 3)
    assert SecureAggregationConfig().shares_and_threshold(9) == (9, 5)
    # SecAgg+'s ring needs an odd number of neighbours
    assert SecureAggregationConfig(num_shares=4).shares_and_threshold(10) == (5, 3)
    assert SecureAggregationConfig(num_shares=7, reconstruction_threshold=5).shares_and_threshold(
        20
    ) == (7, 5)


@pytest.mark.slow
def test_a_federation_with_both_dp_levels_and_secure_aggregation(tmp_path) -> None:
    from privet.common.privacy.federation import plan_federation
    from privet.server.rundir import read_metrics
    from privet.simulations import simulate

    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=150",
            "data.num_clients=3",
            "data.server_test_fraction=0.25",
            "federation.rounds=2",
            "federation.fraction_evaluate=0",
            "federation.min_train_clients=3",
            "privacy.target_epsilon=20",
            "privacy.delta=1e-3",
            "train.batch_size=20",
            "train.local_epochs=0.5",
            "train.num_threads=1",
            "simulation.engine='inprocess'",
            "privacy.secure_aggregation=true",
            "privacy.client_level.enabled=true",
            "privacy.client_level.side='client'",
            "privacy.client_level.noise_multiplier=1.0",
            "privacy.client_level.clipping_norm=0.05",
            f"simulation.output_dir='{tmp_path}'",
        ],
    )
    mech = plan_federation(cfg.privacy.client_level, cfg.federation, num_clients=3)
    run_dir = simulate(cfg, preflight=False)

    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r, rec in enumerate(records[1:], 1):
        assert len(rec["clients_trained"]) == 3 and not rec["errors"]
        assert all(0 < e <= 20 for e in rec["epsilon_per_client"].values())
        assert rec["federation_epsilon"] == pytest.approx(mech.epsilon_after(r), abs=1e-9)
        assert rec["bytes_received"] > 0
    report = json.loads((run_dir / "privacy.json").read_text())
    assert report["secure_aggregation"]["enabled"] is True
    assert report["secure_aggregation"]["tolerated_dropouts_per_neighbourhood"] == 1
    # the mean of the clipped updates passed the server's norm check: every client counted
    assert [r["updates_aggregated"] for r in report["client_level"]["rounds"]] == [3, 3]
