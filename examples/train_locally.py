"""One round of DP-SGD with privet's plain ``train`` function: no Flower, no server, no config file.

Run it from the repository root (about half a minute on a laptop CPU)::

    .venv/bin/python examples/train_locally.py            # the whole MiniLM
    .venv/bin/python examples/train_locally.py --layers 1 # one layer: a few seconds

It builds each argument ``privet.client.train`` takes (model, tokenized data, training settings,
DP settings), trains once, evaluates, and prints the ε this round spent.  A federation does the
same on every client in every round; the privacy layer (``privet.client.plan_round``) then also
keeps the ledger that makes ε cumulative.
"""

from __future__ import annotations

import argparse

from privet.client import DPSettings, evaluate, plan_steps, train
from privet.common.config import AdapterConfig, ModelConfig, TrainConfig
from privet.common.data import Examples, TokenizedExamples
from privet.common.modeling import build_model
from privet.common.privacy import calibrate_noise, epsilon_from_history

# Your rows: texts and integer labels 0..K-1 (names must be mapped first, e.g. sorted).
POSITIVE = ["a lovely film", "great service", "I enjoyed every minute", "warm and friendly"]
NEGATIVE = ["a dull film", "rude staff", "I regret buying it", "cold and noisy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="keep only this many layers")
    parser.add_argument("--epsilon", type=float, default=8.0, help="ε this round may spend")
    args = parser.parse_args()

    texts = (POSITIVE + NEGATIVE) * 8
    labels = ([1] * len(POSITIVE) + [0] * len(NEGATIVE)) * 8
    examples = Examples(texts=texts, labels=labels)

    # 1. the model: the embedded all-MiniLM-L6-v2 with LoRA adapters and a new 2-class head
    model_cfg = ModelConfig(num_hidden_layers=args.layers)
    built = build_model(model_cfg, AdapterConfig(), num_labels=2, seed=0)
    # 2. the data, tokenized once
    data = TokenizedExamples(examples, built.tokenizer, max_length=model_cfg.max_length)
    # 3. how to train: optimizer, learning rate, expected batch size, local epochs
    train_cfg = TrainConfig(batch_size=16, local_epochs=1.0, lr=1e-2)
    # 4. DP-SGD: Poisson rate q = batch_size / n and the steps of one pass; noise calibrated so
    #    that this round spends exactly --epsilon at δ = 1e-5
    rate, steps = plan_steps(len(data), train_cfg)
    delta = 1e-5
    sigma = calibrate_noise(
        target_epsilon=args.epsilon, delta=delta, sample_rate=rate, steps=steps, accountant="rdp"
    )
    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=rate, steps=steps)

    result = train(built.model, data, train_cfg, dp=dp, pad_token_id=built.tokenizer.pad_token_id)
    scores = evaluate(built.model, data, batch_size=32, pad_token_id=built.tokenizer.pad_token_id)
    spent = epsilon_from_history([(sigma, rate, steps)], delta=delta, accountant="rdp")
    print(
        f"trained {result.steps} steps on {result.num_examples} examples "
        f"(noise multiplier {sigma:.3f}); train loss {result.train_loss:.3f}, "
        f"accuracy {scores.accuracy:.2%}; ε spent {spent:.3f} at δ = {delta:g}; "
        f"{len(result.state)} trainable tensors to send"
    )


if __name__ == "__main__":
    main()
