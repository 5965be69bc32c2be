"""Proxy for choosing DP defaults: one DP client, N VADER examples, one round, then test accuracy.

    python benchmarks/dp_recipe_proxy.py optimizer=adamw lr=1e-2 batch_size=64 r=4 layers=[3,4,5] n=2000

Keys: n, eps, clip, r, layers (JSON list), tm (JSON list of target modules), epochs, dp (0/1),
pooling (auto/model/mean), plus any TrainConfig field (optimizer, lr, batch_size, ...).
Prints one JSON line. Results are recorded in docs/benchmarks.md.
"""

import json
import os
import sys
import time
import warnings

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

from privet.client.training import DPSettings, plan_steps, train  # noqa: E402
from privet.common.config import AdapterConfig, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from privet.common.data import TokenizedExamples, build_federated_data  # noqa: E402
from privet.common.evaluation import evaluate  # noqa: E402
from privet.common.modeling import build_model  # noqa: E402
from privet.common.privacy import calibrate_noise  # noqa: E402


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    n_train = int(args.pop("n", "2000"))
    eps = float(args.pop("eps", "8"))
    clip = float(args.pop("clip", "1.0"))
    r = int(args.pop("r", "4"))
    layers = json.loads(args.pop("layers", "null"))
    targets = json.loads(args.pop("tm", '["query", "value"]'))
    epochs = float(args.pop("epochs", "1"))
    dp_on = args.pop("dp", "1") == "1"
    pooling = args.pop("pooling", "auto")
    torch.set_num_threads(int(args.pop("threads", "2")))
    train_cfg = TrainConfig.model_validate({**args, "local_epochs": epochs})
    fed = build_federated_data(
        DataConfig(num_clients=1, client_test_fraction=0.0, server_test_fraction=0.06)
    )
    built = build_model(
        ModelConfig(pooling=pooling),  # type: ignore[arg-type]
        AdapterConfig(r=r, layers=layers, target_modules=targets, top_layers=None),
        num_labels=2,
    )
    train_set = TokenizedExamples(
        fed.clients[0].train.subset(np.arange(n_train)), built.tokenizer, 64
    )
    test_set = TokenizedExamples(fed.server_test, built.tokenizer, 64)
    q, steps = plan_steps(len(train_set), train_cfg)
    dp = None
    if dp_on:
        sigma = calibrate_noise(
            target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
        )
        dp = DPSettings(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, steps=steps)
    start = time.time()
    res = train(built.model, train_set, train_cfg, dp=dp, pad_token_id=0)
    ev = evaluate(built.model, test_set, batch_size=128, pad_token_id=0)
    trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    print(
        json.dumps(
            {
                "argv": argv,
                "sigma": dp.noise_multiplier if dp else None,
                "steps": steps,
                "trainable": trainable,
                "train_loss": round(res.train_loss, 4),
                "accuracy": round(ev.accuracy, 4),
                "n_test": len(test_set),
                "train_s": round(res.seconds, 1),
                "total_s": round(time.time() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
