"""A DP federation of a causal LM, end to end in this process: the loss falls, the ledger charges.

The data are ~200 hand-made chat examples (a review in, ``positive``/``negative`` out) split over
three clients; the model is the tiny random Llama of ``llm_fixtures``. Until the data loaders give
generation examples from the configuration, the federation's data are put in place of the loaded
ones (``common/data/federated.py``'s per-process cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .inprocess_runs import simulate_causal_lm
from .llm_fixtures import tiny_llama_dir

ROUNDS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = [f"federation.rounds={ROUNDS}", "train.local_epochs=1.0"]
    return simulate_causal_lm(tmp_path_factory.mktemp("llm-runs"), "llm", extra)


def test_the_loss_falls_over_rounds_with_dp(run: Path) -> None:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == list(range(ROUNDS + 1))
    losses = [r["server_loss"] for r in recs]
    assert losses[-1] < 0.8 * losses[0], losses  # round 0 is the base model
    train = [r["train_loss"] for r in recs[1:]]
    assert train[-1] < train[0], train
    for r in recs:
        m = r["server_metrics"]
        assert m["perplexity"] == pytest.approx(2.718281828 ** r["server_loss"], rel=1e-6)
        assert 0 <= m["token-accuracy"] <= 1 and r["server_accuracy"] == m["exact-match"]
    assert set(recs[-1]["client_metrics"]) == {"perplexity", "token-accuracy", "exact-match"}


def test_each_round_records_generated_samples_and_the_report_shows_them(run: Path) -> None:
    from privet.server.rundir.html_report import write_report

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        samples = r["server_samples"]
        assert len(samples) == 3
        assert samples[0]["prompt"].startswith("Review ") and samples[0]["target"] == "positive"
        assert all(isinstance(s["generated"], str) for s in samples)
    page = write_report(run).read_text(encoding="utf-8")
    assert "Generated samples" in page and recs[0]["server_samples"][1]["prompt"] in page


def test_the_ledger_charges_every_client(run: Path) -> None:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eps = recs[-1]["epsilon_per_client"]
    assert set(eps) == {"client-0", "client-1", "client-2"}
    assert all(0 < e <= 8.0 + 1e-6 for e in eps.values())
    report = json.loads((run / "privacy.json").read_text())
    assert report  # written from the same history
    assert (run / "final_adapter" / "adapter_config.json").is_file()


def test_merged_export_generates_with_the_stock_pipeline(run: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    from privet.server.rundir.export import export_run

    res = export_run(run, out=tmp_path / "merged")
    assert res.merged and res.pipeline == "text-generation" and res.id2label == {}
    generate = pipeline("text-generation", model=str(res.out))
    chat = [{"role": "user", "content": "Review 1: a waste of money"}]
    out = generate(chat, max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


def test_adapter_only_export_loads_with_peft_and_matches_the_merged_model(
    run: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from privet.server.rundir.export import export_run

    merged = export_run(run, out=tmp_path / "merged").out
    adapter = export_run(run, out=tmp_path / "adapter", merge=False).out
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir())
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    full = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    ids = AutoTokenizer.from_pretrained(str(adapter))("a lovely film", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**ids).logits, full(**ids).logits, rtol=1e-4, atol=1e-5
        )
