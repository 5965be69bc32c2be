"""Secure aggregation: what SecAgg+ costs per round on LoRA-sized updates, in time and bytes.

The same round is run with and without SecAgg+, interleaved, in one process: the default model's
trainable LoRA arrays (their real shapes) travel from the server to every client and back, through
privet's ``SecAggGrid`` and the client's ``secagg_mod`` (Flower's SecAggPlusWorkflow and
secaggplus_mod underneath) or through plain delivery. The clients do not train (their update is a
fixed random one), so the difference is the protocol alone: key agreement, Shamir shares, masking,
unmasking. Clients run one after another in this process, so a round's time is the server's work
plus every client's; in a federation the clients' parts run in parallel.

Bytes are what the messages carry: arrays (``ArrayRecord.count_bytes``) plus the byte strings of
the protocol (public keys, encrypted shares, masked vectors).

With ``--federation`` it also runs the same small federation (default model, sample-level DP,
in-process engine, real training) with and without SecAgg+, interleaved, and compares the
seconds per round the server records.

    python benchmarks/bench_secagg.py [--clients 10] [--repeats 5] [--quick] [--federation]
"""

from __future__ import annotations

import time
from typing import Any, cast

import benchlib
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from privet.client.secagg import secagg_mod
from privet.common.config import PrivetConfig, SecureAggregationConfig
from privet.common.modeling import build_model, trainable_state
from privet.server.secagg import SecAggGrid
from privet.simulations.inprocess import InProcessGrid, _task_identity


def lora_arrays() -> dict[str, np.ndarray]:
    """The default model's trainable arrays (LoRA adapter and head), as float32 numpy arrays."""
    cfg = PrivetConfig()
    built = build_model(cfg.model, cfg.adapter, num_labels=2, seed=0)
    return {k: v.detach().float().numpy().copy() for k, v in trainable_state(built.model).items()}


def client_app(updates: dict[int, dict[str, np.ndarray]]) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secagg_mod(required=False, sa=SecureAggregationConfig())])
    def _train(msg: Message, context: Context) -> Message:
        sent = msg.content.array_records["arrays"]
        new = ArrayRecord({k: Array(sent[k].numpy() + updates[context.node_id][k]) for k in sent})
        metrics = MetricRecord({"num-examples": 100, "epsilon": 1.0})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    return app


def messages(arrays: dict[str, np.ndarray], n: int) -> list[Message]:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    return [Message(content, dst_node_id=i, message_type="train") for i in range(1, n + 1)]


def bert_base_lora() -> dict[str, np.ndarray]:
    """LoRA r 8 on the query and value projections of BERT-base's 12 layers: 294,912 weights."""
    rng = np.random.default_rng(1)
    return {
        f"layer{i}.{proj}.lora_{ab}": rng.normal(0, 0.02, shape).astype(np.float32)
        for i in range(12)
        for proj in ("query", "value")
        for ab, shape in (("A", (8, 768)), ("B", (768, 8)))
    }


def measure(arrays: dict[str, np.ndarray], n: int, repeats: int) -> dict[str, Any]:
    """Time and bytes of one round with and without SecAgg+ (interleaved, medians)."""
    rng = np.random.default_rng(0)
    updates = {
        i: {k: rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in arrays.items()}
        for i in range(1, n + 1)
    }
    exact = {
        k: arrays[k].astype(np.float64) + np.mean([updates[i][k] for i in updates], axis=0)
        for k in arrays
    }
    app = client_app(updates)
    seen: dict[str, Any] = {}

    def plain() -> float:
        grid = InProcessGrid(app, num_nodes=n)
        start = time.perf_counter()
        out = messages(arrays, n)
        sent = sum(m.content.array_records["arrays"].count_bytes() for m in out)
        replies = grid.send_and_receive(out)
        for k in arrays:
            np.mean([r.content.array_records["arrays"][k].numpy() for r in replies], axis=0)
        elapsed = time.perf_counter() - start
        received = sum(r.content.array_records["arrays"].count_bytes() for r in replies)
        seen["plain"] = (sent, received)
        return elapsed

    def secure() -> float:
        grid = SecAggGrid(
            cast(Grid, InProcessGrid(app, num_nodes=n)),
            SecureAggregationConfig(),
            uniform_weights=True,
            max_weight=1,
            timeout=600.0,
        )
        start = time.perf_counter()
        replies = list(grid.send_and_receive(messages(arrays, n)))
        elapsed = time.perf_counter() - start
        assert len(replies) == n and not any(r.has_error() for r in replies)
        sent, received = grid.take_byte_counts()
        seen["secagg"] = (sent, received, replies[0].content.array_records["arrays"])
        return elapsed

    with _task_identity(run_id=1):
        times = benchlib.interleaved({"plain": plain, "secagg": secure}, repeats)
    s_sent, s_recv, s_mean = seen["secagg"]
    p_sent, p_recv = seen["plain"]
    err = max(
        float(np.max(np.abs(s_mean[k].numpy().astype(np.float64) - exact[k]))) for k in arrays
    )
    return {
        "weights": sum(a.size for a in arrays.values()),
        "plain_s": benchlib.median(times["plain"]),
        "secagg_s": benchlib.median(times["secagg"]),
        "plain_bytes": (p_sent // n, p_recv // n),
        "secagg_bytes": (s_sent // n, s_recv // n),
        "max_error": err,
        "times": times,
    }


def federation(args: Any, rows: list[dict[str, Any]], details: dict[str, Any]) -> None:
    """The same federation with and without SecAgg+: seconds per round from metrics.jsonl."""
    import tempfile
    from pathlib import Path

    from privet.common.config import load_config
    from privet.server.rundir import read_metrics
    from privet.simulations import simulate

    out = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    runs = 0
    accuracy: dict[str, list[float]] = {"plain": [], "secagg": []}

    def run(secure: bool) -> float:
        nonlocal runs
        runs += 1
        cfg = load_config(
            None,
            [
                "data.max_examples=800",
                "data.num_clients=4",
                "federation.rounds=2",
                "federation.fraction_evaluate=0",
                "train.num_threads=1",
                "simulation.engine='inprocess'",
                f"privacy.secure_aggregation={'true' if secure else 'false'}",
                f"model.device='{args.device}'",
                f"simulation.output_dir='{out}'",
                f"simulation.run_name='run{runs}'",
            ],
        )
        records = read_metrics(simulate(cfg))
        accuracy["secagg" if secure else "plain"].append(float(records[-1]["server_accuracy"]))
        # round 2: round 1 holds the model loads and noise calibration
        return float(records[-1]["seconds"])

    times = benchlib.interleaved(
        {"plain": lambda: run(False), "secagg": lambda: run(True)}, args.repeats or 1, warmup=False
    )
    t_plain, t_sec = benchlib.median(times["plain"]), benchlib.median(times["secagg"])
    details["federation"] = times
    rows += [
        benchlib.row("federation (4 clients, DP-SGD, default model): round 2 plain", t_plain, "s"),
        benchlib.row("federation: round 2 with SecAgg+", t_sec, "s"),
        benchlib.row("federation: SecAgg+ / plain, round time", t_sec / t_plain, "x"),
        benchlib.row(
            "federation: server accuracy after round 2, plain / SecAgg+",
            f"{benchlib.median(accuracy['plain']):.1%} / {benchlib.median(accuracy['secagg']):.1%}",
        ),
    ]
    details["federation_accuracy"] = accuracy


def main() -> None:
    p = benchlib.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=10, help="clients per round")
    p.add_argument("--federation", action="store_true", help="also time a real training federation")
    args = p.parse_args()
    n = 3 if args.quick else args.clients
    repeats = args.repeats or (1 if args.quick else 5)
    sa = SecureAggregationConfig()
    step = 2 * sa.clipping_range / sa.quantization_range
    rows = [benchlib.row("clients per round", n)]
    details: dict[str, Any] = {"clients": n, "quantization_step": step}
    sizes = {"default LoRA": lora_arrays()}
    if not args.quick:
        sizes["BERT-base LoRA r8 q,v"] = bert_base_lora()
    for label, arrays in sizes.items():
        m = measure(arrays, n, repeats)
        details[label] = m
        t_plain, t_sec = m["plain_s"], m["secagg_s"]
        (pd, pu), (sd, su) = m["plain_bytes"], m["secagg_bytes"]
        rows += [
            benchlib.row(f"{label}: trainable weights", m["weights"]),
            benchlib.row(f"{label}: plain round (deliver + mean)", t_plain, "s"),
            benchlib.row(f"{label}: SecAgg+ round (all clients' crypto, serial)", t_sec, "s"),
            benchlib.row(f"{label}: SecAgg+ cost per client per round", (t_sec - t_plain) / n, "s"),
            benchlib.row(f"{label}: bytes per client down / up, plain", f"{pd:,} / {pu:,}"),
            benchlib.row(f"{label}: bytes per client down / up, SecAgg+", f"{sd:,} / {su:,}"),
            benchlib.row(f"{label}: SecAgg+ / plain, upload bytes", su / pu, "x"),
            benchlib.row(
                f"{label}: max |SecAgg+ mean - exact mean|",
                m["max_error"],
                goal=f"<= {step:.2g} (one level)",
                met=m["max_error"] <= step,
            ),
        ]
    if args.federation:
        federation(args, rows, details)
    benchlib.write_result("secagg_cost", rows, details, out=args.out)


if __name__ == "__main__":
    main()
