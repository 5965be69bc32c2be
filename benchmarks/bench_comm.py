"""Communication: bytes per client per round for LoRA and full weights, per transport encoding,
and the accuracy each encoding costs on the default task (a smaller federation, DP on).

The byte counts are Flower's own ``ArrayRecord.count_bytes()`` of what travels. The accuracy runs
are real simulations (``privet simulate`` with ``federation.transport`` set), same seeds, so the
encodings differ only in the rounding of what travels.

    python benchmarks/bench_comm.py [--device cuda] [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import benchlib

from privet.common.config import PrivetConfig, load_config
from privet.common.modeling import build_model, trainable_state
from privet.common.transport import encode_state

ENCODINGS = ("float32", "float16", "int8")


def config(args: Any, out: Path, encoding: str) -> PrivetConfig:
    rounds, examples, epochs = (2, 1500, 0.1) if args.quick else (3, 3000, 0.15)
    return load_config(
        None,
        [
            f"data.max_examples={examples}",
            "data.num_clients=2",
            f"federation.rounds={rounds}",
            "federation.fraction_evaluate=0.0",
            f"federation.transport='{encoding}'",
            f"train.local_epochs={epochs}",
            f"model.device='{args.device}'",
            f"model.mixed_precision='{args.mixed_precision}'",
            f"simulation.gpus_per_client={0.5 if args.device == 'cuda' else 0.0}",
            f"simulation.output_dir='{out}'",
            f"simulation.run_name='{encoding}'",
        ],
    )


def sizes() -> dict[str, dict[str, int]]:
    """Bytes of one message's arrays (one direction) per adapter and encoding."""
    cfg = PrivetConfig()
    out: dict[str, dict[str, int]] = {}
    for label, method in (("LoRA (default)", "lora"), ("full fine-tuning", "full")):
        built = build_model(
            cfg.model, cfg.adapter.model_copy(update={"method": method}), num_labels=2
        )
        state = trainable_state(built.model)
        out[label] = {e: int(encode_state(state, e).count_bytes()) for e in ENCODINGS}  # type: ignore[arg-type]
        out[label]["parameters"] = sum(v.numel() for v in state.values())
    return out


def main() -> None:
    p = benchlib.parser(__doc__ or "")
    args = p.parse_args()
    benchlib.check_device(args)
    size = sizes()
    from privet.simulations import simulate

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for enc in ENCODINGS:
            cfg = config(args, Path(tmp), enc)
            run_dir = simulate(cfg)
            recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            trained = [r for r in recs if r["round"] > 0]
            clients = max(len(r["clients_trained"]) for r in trained)
            runs[enc] = {
                "accuracy": [r["server_accuracy"] for r in recs],
                "bytes_sent_per_client": [r["bytes_sent"] / clients for r in trained],
                "bytes_received_per_client": [r["bytes_received"] / clients for r in trained],
                "epsilon": [r["max_epsilon"] for r in trained],
            }
    rows = []
    for label, by in size.items():
        for enc in ENCODINGS:
            rows.append(benchlib.row(f"{label}, {enc}: bytes per message", by[enc], "B"))
    lora32 = size["LoRA (default)"]["float32"]
    full32 = size["full fine-tuning"]["float32"]
    rows.append(benchlib.row("full weights / LoRA (float32)", full32 / lora32, "x"))
    base = runs["float32"]["accuracy"][-1]
    for enc in ENCODINGS:
        r = runs[enc]
        rows.append(
            benchlib.row(
                f"{enc}: measured bytes per client per round (out + back)",
                r["bytes_sent_per_client"][-1] + r["bytes_received_per_client"][-1],
                "B",
            )
        )
        rows.append(benchlib.row(f"{enc}: final server accuracy", 100 * r["accuracy"][-1], "%"))
        if enc != "float32":
            rows.append(
                benchlib.row(
                    f"{enc}: accuracy cost vs float32", 100 * (base - r["accuracy"][-1]), "points"
                )
            )
    cfg = config(args, Path("."), "float32")
    details = {
        "sizes": size,
        "runs": runs,
        "clients": cfg.data.num_clients,
        "rounds": cfg.federation.rounds,
        "max_examples": cfg.data.max_examples,
        "local_epochs": cfg.train.local_epochs,
    }
    benchlib.write_result("communication", rows, details, args.out)


if __name__ == "__main__":
    main()
