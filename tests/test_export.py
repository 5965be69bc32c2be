"""`privet export`: a merged transformers folder that `pipeline` loads, and the PEFT folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from privet.server.rundir.export import ExportError, export_run
from privet.simulations.cli import app

from .rundirs import make_run

TEXTS = [
    "what a wonderful film",
    "the plot was dull, the acting worse and the ending made no sense at all",
    "ok",
]


def _privet_probs(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Privet's own prediction: the model as trained (adapter not merged, privet's pooling)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.softmax(-1)


def _pipeline_probs(clf, texts: list[str], **kw) -> torch.Tensor:
    rows = clf(texts, top_k=None, truncation=True, **kw)
    return torch.tensor(
        [
            [next(d["score"] for d in row if d["label"] == lab) for lab in ("negative", "positive")]
            for row in rows
        ]
    )


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory: pytest.TempPathFactory):
    return make_run(tmp_path_factory.mktemp("runs"), "mean")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from privet.common.modeling import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("embedded:all-MiniLM-L6-v2"))


def test_merged_mean_pooled_model_predicts_like_privet(mean_run, tokenizer, tmp_path: Path) -> None:
    from transformers import pipeline

    run_dir, model = mean_run
    res = export_run(run_dir, out=tmp_path / "model")
    assert res.merged and res.needs_trust_remote_code
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "modeling_privet_bert.py",
    } <= files
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["privet"]["pooling"] == "mean"
    # No LoRA weight is left: the adapter is merged into the base weights.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert not [k for k in keys if "lora" in k or "modules_to_save" in k]

    expected = _privet_probs(model, tokenizer, TEXTS)
    # The head and adapter matter: a fresh model would predict something else.
    assert expected.std() > 0.01
    clf = pipeline("text-classification", model=str(tmp_path / "model"), trust_remote_code=True)
    one_by_one = _pipeline_probs(clf, TEXTS)
    torch.testing.assert_close(one_by_one, expected, atol=1e-5, rtol=1e-4)
    # Batched (padded) inputs too: the pooling must respect the attention mask.
    batched = _pipeline_probs(clf, TEXTS, batch_size=3)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-4)


def test_mean_pooled_export_refuses_to_load_as_plain_bert(mean_run, tmp_path: Path) -> None:
    """Without trust_remote_code transformers must stop, not build a CLS-pooled model silently."""
    from transformers import AutoModelForSequenceClassification

    run_dir, _ = mean_run
    export_run(run_dir, out=tmp_path / "model")
    with pytest.raises((ValueError, OSError), match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(
            str(tmp_path / "model"), trust_remote_code=False
        )


def test_model_pooled_export_loads_without_custom_code(tokenizer, tmp_path: Path) -> None:
    from transformers import pipeline

    run_dir, model = make_run(tmp_path / "runs", "cls", extra=["model.pooling='model'"])
    res = export_run(run_dir, out=tmp_path / "model")
    assert not res.needs_trust_remote_code
    assert not (tmp_path / "model" / "modeling_privet_bert.py").exists()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["architectures"] == ["BertForSequenceClassification"]
    clf = pipeline("text-classification", model=str(tmp_path / "model"))
    torch.testing.assert_close(
        _pipeline_probs(clf, TEXTS), _privet_probs(model, tokenizer, TEXTS), atol=1e-5, rtol=1e-4
    )
    top = clf("what a wonderful film")[0]
    assert top["label"] in ("negative", "positive")


def test_adapter_only_is_the_peft_folder(mean_run, tokenizer, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from privet.common.modeling import resolve_model_path, use_mean_pooling

    run_dir, model = mean_run
    res = export_run(run_dir, out=tmp_path / "adapter", merge=False)
    assert not res.merged
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()
    info = json.loads((tmp_path / "adapter" / "privet.json").read_text())
    src = resolve_model_path(info["base_model"])
    cfg = AutoConfig.from_pretrained(src, num_labels=2, num_hidden_layers=info["num_hidden_layers"])
    base = AutoModelForSequenceClassification.from_pretrained(src, config=cfg)
    use_mean_pooling(base)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(
        _privet_probs(loaded, tokenizer, TEXTS), _privet_probs(model, tokenizer, TEXTS)
    )


def test_refusals(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path / "runs", "unfinished", finished=False)
    with pytest.raises(ExportError, match="final_adapter"):
        export_run(run_dir, out=tmp_path / "m")
    done, _ = make_run(tmp_path / "runs", "done")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_run(done, out=tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    with pytest.raises(ExportError, match="--labels names 3 labels"):
        export_run(done, out=tmp_path / "m2", labels=["a", "b", "c"])


def test_cli_export_and_labels(mean_run, tmp_path: Path) -> None:
    run_dir, _ = mean_run
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["export", str(run_dir), "--merge", "--out", str(tmp_path / "m"), "--labels", "bad,good"],
    )
    assert res.exit_code == 0, res.output
    assert "trust_remote_code=True" in res.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["id2label"] == {
        "0": "bad",
        "1": "good",
    }
    res = runner.invoke(
        app, ["export", str(run_dir), "--adapter-only", "--out", str(tmp_path / "a")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    res = runner.invoke(
        app, ["export", str(run_dir), "--adapter-only", "--merge", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code != 0


def test_export_of_a_fixed_noise_run(tokenizer, tmp_path: Path) -> None:
    """config.toml of such a run leaves target_epsilon out (TOML has no null); export still works."""
    from transformers import pipeline

    run_dir, model = make_run(
        tmp_path / "runs",
        "sigma",
        extra=["privacy.target_epsilon=none", "privacy.noise_multiplier=1.1"],
    )
    export_run(run_dir, out=tmp_path / "model")
    clf = pipeline("text-classification", model=str(tmp_path / "model"), trust_remote_code=True)
    torch.testing.assert_close(
        _pipeline_probs(clf, TEXTS), _privet_probs(model, tokenizer, TEXTS), atol=1e-5, rtol=1e-4
    )
