"""privet against the same federation written the way Flower's own examples write it.

The baseline below is our own code, in the style of Flower's Opacus and fine-tuning examples: for
every message the ClientApp loads the model again, tokenizes its data again, builds a new Opacus
``PrivacyEngine`` with ``make_private`` (hooks, Poisson data loader, whole batches padded to their
longest text) and reports ``get_epsilon`` of that fresh engine, i.e. the epsilon of one round.
Both federations use the same model, LoRA adapter, data split, clients, rounds, steps, noise
multiplier and clip; only trainable weights travel in both (as in FlowerTune). Evaluation is off.
privet must be faster per round and report cumulative epsilon.

    python benchmarks/bench_flower.py [--device cuda] [--quick]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from privet.client.training import plan_steps
from privet.common.config import PrivetConfig, load_config
from privet.common.data import TokenizedExamples, cached_federated_data, collate
from privet.common.modeling import build_model, trainable_state
from privet.common.privacy import calibrate_noise


def config(args: Any, out: Path, name: str) -> PrivetConfig:
    rounds, examples, epochs = (2, 2000, 0.1) if args.quick else (3, 4000, 0.1)
    return load_config(
        None,
        [
            f"data.max_examples={examples}",
            "data.num_clients=2",
            f"federation.rounds={rounds}",
            "federation.server_evaluation=false",
            "federation.fraction_evaluate=0.0",
            f"train.local_epochs={epochs}",
            f"model.device='{args.device}'",
            f"simulation.gpus_per_client={0.5 if args.device == 'cuda' else 0.0}",
            f"simulation.output_dir='{out}'",
            f"simulation.run_name='{name}'",
        ],
    )


# ---------------------------------------------------------------------------------------------
# The baseline: a ClientApp in the style of Flower's examples.
# ---------------------------------------------------------------------------------------------
def baseline_client_app(cfg: PrivetConfig, sigma: float) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        from opacus import PrivacyEngine

        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        device = torch.device(cfg.model.device if cfg.model.device != "auto" else "cpu")
        # Everything is built again for every message, as the examples do.
        built = build_model(cfg.model, cfg.adapter, num_labels=2, seed=cfg.train.seed)
        model = built.model.to(device)
        state = msg.content["arrays"].to_torch_state_dict()
        model.load_state_dict(state, strict=False)
        data = TokenizedExamples(
            cached_federated_data(cfg.data).clients[pid].train,
            built.tokenizer,
            cfg.model.max_length,
        )
        pad = int(built.tokenizer.pad_token_id)
        loader = torch.utils.data.DataLoader(
            [data[i] for i in range(len(data))],
            batch_size=cfg.train.batch_size,
            collate_fn=lambda items: collate(items, pad),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
        engine = PrivacyEngine()  # new every round: its accountant forgets earlier rounds
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=cfg.privacy.max_grad_norm,
            poisson_sampling=True,
        )
        _, steps = plan_steps(len(data), cfg.train)
        model.train()
        done = 0
        while done < steps:
            for batch in loader:
                if done == steps:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = batch.pop("labels")
                if labels.numel():
                    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                done += 1
        eps = engine.get_epsilon(cfg.privacy.delta)
        out = {k: v.detach().cpu() for k, v in model._module.state_dict().items() if k in state}
        content = RecordDict(
            {
                "arrays": ArrayRecord(out),
                "metrics": MetricRecord({"num-examples": len(data), "epsilon": float(eps)}),
            }
        )
        return Message(content, reply_to=msg)

    return app


class TimedFedAvg(FedAvg):
    """FedAvg that notes each round's wall time and the largest epsilon a client reported."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.t0 = 0.0
        self.seconds: list[float] = []
        self.epsilon: list[float] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):  # type: ignore[no-untyped-def]
        self.t0 = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        self.seconds.append(time.perf_counter() - self.t0)
        eps = [float(r.content["metrics"]["epsilon"]) for r in replies if not r.has_error()]
        self.epsilon.append(max(eps) if eps else float("nan"))
        return out


def run_baseline(cfg: PrivetConfig, sigma: float) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from privet.simulations.run import _quiet_flower

    strategy = TimedFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2
    )
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        built = build_model(cfg.model, cfg.adapter, num_labels=2, seed=cfg.train.seed)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(trainable_state(built.model)),
            num_rounds=cfg.federation.rounds,
        )

    _quiet_flower(False)
    start = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=baseline_client_app(cfg, sigma),
        num_supernodes=cfg.data.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": cfg.simulation.gpus_per_client},
            "init_args": {
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": False,
            },
        },
    )
    return {
        "total_seconds": time.perf_counter() - start,
        "round_seconds": strategy.seconds,
        "epsilon": strategy.epsilon,
    }


def main() -> None:
    p = benchlib.parser(__doc__ or "")
    args = p.parse_args()
    benchlib.check_device(args)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, Path(tmp), "privet")
        fed = cached_federated_data(cfg.data)
        n = min(len(c.train) for c in fed.clients)
        q, steps = plan_steps(n, cfg.train)
        assert cfg.privacy.target_epsilon is not None
        # privet's calibration: all planned rounds together spend target_epsilon.
        sigma = calibrate_noise(
            target_epsilon=cfg.privacy.target_epsilon,
            delta=cfg.privacy.delta,
            sample_rate=q,
            steps=steps * cfg.federation.rounds,
            accountant=cfg.privacy.accountant,
        )
        base = run_baseline(cfg, sigma)
        ours = benchlib.timed_simulation(cfg)
    later = slice(1, None)
    b_steady = float(np.median(base["round_seconds"][later]))
    o_steady = float(np.median(ours["round_seconds"][later]))
    rows = [
        benchlib.row("Flower-example style: round 1", base["round_seconds"][0], "s"),
        benchlib.row("privet: round 1 (Ray started before it)", ours["round_seconds"][0], "s"),
        benchlib.row("Flower-example style: later rounds (median)", b_steady, "s"),
        benchlib.row("privet: later rounds (median)", o_steady, "s"),
        benchlib.row(
            "privet / Flower-example style, per round",
            o_steady / b_steady,
            "x",
            "< 1",
            o_steady < b_steady,
        ),
        benchlib.row(
            "epsilon reported by the baseline, per round",
            ", ".join(f"{e:.2f}" for e in base["epsilon"]),
        ),
        benchlib.row(
            "epsilon reported by privet (cumulative)",
            ", ".join(f"{e:.2f}" for e in ours["epsilon"]),
        ),
        benchlib.row(
            "privet's epsilon grows across rounds",
            "yes"
            if ours["epsilon"] == sorted(ours["epsilon"])
            and ours["epsilon"][-1] > ours["epsilon"][0]
            else "no",
            "",
            "cumulative",
            ours["epsilon"][-1] > max(base["epsilon"]),
        ),
    ]
    details = {
        "noise_multiplier": sigma,
        "sample_rate": q,
        "steps_per_round": steps,
        "baseline": base,
        "privet": ours,
    }
    benchlib.write_result("vs_flower_examples", rows, details, args.out)


if __name__ == "__main__":
    main()
