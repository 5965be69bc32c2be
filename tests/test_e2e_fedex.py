"""FedEx-LoRA end to end (in-process engine): it learns, and its residuals survive resume and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privet.common.config import PrivetConfig, load_config
from privet.common.data import TokenizedExamples, cached_federated_data
from privet.common.evaluation import evaluate
from privet.common.lora_residual import (
    RESIDUAL_FILE,
    fold_residuals,
    is_residual_key,
    load_global_state,
    split_residuals,
)
from privet.common.modeling import build_model
from privet.server.app import make_server_app
from privet.server.recording import RoundRecord
from privet.server.rundir import checkpoint_path, read_metrics
from privet.server.rundir.export import ExportError, export_run, load_run_model
from privet.simulations import simulate
from privet.simulations.inprocess import run_in_process
from privet.simulations.run import _client_app

pytestmark = pytest.mark.slow

ROUNDS = 3


def _config(out: Path) -> PrivetConfig:
    return load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "adapter.freeze_a=false",
            "aggregation.lora='fedex'",
            "data.max_examples=600",
            "data.num_clients=2",
            "data.server_test_fraction=0.2",
            f"federation.rounds={ROUNDS}",
            "federation.fraction_evaluate=0",
            # DP off: with trainable A, a one-layer model on 600 sentences did not learn reliably
            # under DP-SGD in 3 rounds on CPU (see the issue note); the aggregation is what is tested.
            "privacy.enabled=false",
            "train.local_epochs=2",
            "train.batch_size=16",
            "train.lr=0.02",
            "train.num_threads=1",
            "simulation.engine='inprocess'",
            f"simulation.output_dir='{out}'",
            "simulation.run_name='fedex'",
        ],
    )


class _CrashError(Exception):
    pass


class _CrashAfter:
    """An observer that kills the coordinator once round ``n`` is on disk (like a crash there)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def run_started(self, **_: object) -> None:
        pass

    def round_started(self, server_round: int) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        if record.round == self.n:
            raise _CrashError


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrivetConfig, Path]:
    out = tmp_path_factory.mktemp("runs")
    cfg = _config(out)
    # Crash after round 2, then the coordinator's resume path for round 3: the residuals
    # accumulated so far must come back from the checkpoint and go on to the clients.
    with pytest.raises(_CrashError):
        simulate(cfg, observer=_CrashAfter(ROUNDS - 1))
    run_dir = out / "fedex"
    n = len(cached_federated_data(cfg.data).clients)
    server = make_server_app(cfg, run_dir=run_dir, resume=True)
    client = _client_app(cfg, state_dir=run_dir / "clients", num_clients=n, num_labels=2)
    run_in_process(server, client, num_nodes=n)
    return cfg, run_dir


def test_learns_and_pays_the_residual_in_bytes(run) -> None:
    _, run_dir = run
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))
    assert records[-1]["server_accuracy"] > records[0]["server_accuracy"] + 0.05
    # Round 1 sends no residual yet; from round 2 on each of the 2 clients also gets two 384 x 384
    # float32 matrices (query and value), 1.18 MB, on top of the adapter.
    residual = 2 * 384 * 384 * 4
    assert records[2]["bytes_sent"] - records[1]["bytes_sent"] >= 2 * residual
    assert records[3]["bytes_sent"] == records[2]["bytes_sent"]  # the resumed round sent it too


def test_checkpoints_and_final_adapter_hold_the_residuals(run) -> None:
    cfg, run_dir = run
    last = load_file(str(checkpoint_path(run_dir, ROUNDS)))
    adapter, residuals = split_residuals(last)
    assert len(residuals) == 2 and all(v.abs().sum() > 0 for v in residuals.values())
    # the resumed round added to what round 2 left: the residuals changed
    before = split_residuals(load_file(str(checkpoint_path(run_dir, ROUNDS - 1))))[1]
    assert any(not torch.equal(before[k], residuals[k]) for k in residuals)
    saved = load_file(str(run_dir / "final_adapter" / RESIDUAL_FILE))
    assert set(saved) == set(residuals)
    assert all(torch.equal(saved[k], residuals[k]) for k in saved)

    # The server's recorded accuracy is that of the global model the checkpoint holds.
    fed = cached_federated_data(cfg.data)
    built = build_model(cfg.model, cfg.adapter, num_labels=fed.num_labels, seed=cfg.train.seed)
    load_global_state(built.model, last)
    res = evaluate(
        built.model,
        TokenizedExamples(fed.server_test, built.tokenizer, max_length=cfg.model.max_length),
        batch_size=cfg.train.eval_batch_size,
        pad_token_id=int(built.tokenizer.pad_token_id),
        device=torch.device("cpu"),
    )
    assert res.accuracy == pytest.approx(read_metrics(run_dir)[-1]["server_accuracy"], abs=1e-9)
    assert not any(is_residual_key(k) for k in adapter)


def test_merged_export_carries_the_residuals(run, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    _, run_dir = run
    with pytest.raises(ExportError, match="leave out --adapter-only"):
        export_run(run_dir, out=tmp_path / "peft", merge=False)
    model, tokenizer, _ = load_run_model(run_dir)
    export_run(run_dir, out=tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "merged"), trust_remote_code=True
    ).eval()
    texts = ["a wonderful, warm film", "dull and far too long", "fine"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits
        got = merged(**enc).logits
        fold_residuals(model, {})  # the same adapter without the residuals
        plain = model(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-3  # ... is a different model
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["privet"]["pooling"] == "mean"
