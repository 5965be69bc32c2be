from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privet.common.config import DataConfig
from privet.common.data import (
    VADER_COUNTS,
    build_federated_data,
    fetch_vader,
    load_vader,
    natural_partition,
    resolve_cache_dir,
)
from privet.common.data import vader as vader_module
from privet.common.errors import DataError

FILES = sorted(vader_module.VADER_FILES.values())


@pytest.fixture(scope="module")
def vader_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root filled by the real fetch path (pip download from PyPI), once per session."""
    root = tmp_path_factory.mktemp("privet-cache")
    fetch_vader(root)
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network touched: subprocess.run{args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_fetch_layout_and_manifest(vader_root: Path) -> None:
    folder = vader_root / "vader-3.3.2"
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == sorted([*FILES, "manifest.json", "vaderSentiment-3.3.2.tar.gz"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sdist_sha256"] == vader_module.VADER_SDIST_SHA256
    assert sorted(manifest["files"]) == FILES
    # Lines keep their CRLF endings on disk: the parser copes with them.
    assert b"\r\n" in (folder / "tweets_GroundTruth.txt").read_bytes()[:400]


def test_cache_hit_touches_no_network(vader_root: Path, no_network: None) -> None:
    assert fetch_vader(vader_root) == vader_root / "vader-3.3.2"


def test_damaged_cache_repairs_offline(vader_root: Path, tmp_path: Path, no_network: None) -> None:
    root = tmp_path / "cache"
    shutil.copytree(vader_root, root)
    damaged = root / "vader-3.3.2" / "tweets_GroundTruth.txt"
    damaged.write_bytes(b"1\t3.0\tnot the real file\n")
    # The kept sdist re-extracts the file; no download is needed.
    folder = fetch_vader(root)
    assert load_vader(root, ["tweets"]).labels.size == VADER_COUNTS["tweets"]
    assert (folder / "tweets_GroundTruth.txt").read_bytes() == (
        vader_root / "vader-3.3.2" / "tweets_GroundTruth.txt"
    ).read_bytes()


def test_given_sdist_skips_pip(vader_root: Path, tmp_path: Path, no_network: None) -> None:
    sdist = vader_root / "vader-3.3.2" / "vaderSentiment-3.3.2.tar.gz"
    folder = fetch_vader(tmp_path / "c", sdist=sdist)
    assert sorted(p.name for p in folder.glob("*_GroundTruth.txt")) == FILES


def test_sdist_checksum_mismatch(tmp_path: Path, no_network: None) -> None:
    fake = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    fake.write_bytes(b"not the sdist")
    with pytest.raises(DataError, match="does not match the pinned sha256"):
        fetch_vader(tmp_path / "c", sdist=fake)


def test_vader_counts(vader_root: Path) -> None:
    ex = load_vader(vader_root)
    assert len(ex) == 19_136
    assert Counter(ex.keys["domain"]) == VADER_COUNTS
    assert VADER_COUNTS == {"amazon": 2943, "movie": 10043, "nyt": 2788, "tweets": 3362}
    assert set(np.unique(ex.labels).tolist()) == {0, 1}
    assert all(t.strip() == t and t for t in ex.texts)
    assert not any("\r" in t for t in ex.texts)


def test_vader_keys_and_labels(vader_root: Path) -> None:
    ex = load_vader(vader_root, ["nyt", "tweets"], threshold=0.5)
    # Canonical domain order whatever the order asked for.
    assert ex.keys["domain"][0] == "tweets" and ex.keys["domain"][-1] == "nyt"
    docs = ex.keys["document"]
    # First rows of the files: tweet 1 (valence 2.73) and NYT 1_3 (1.5; 1_1 and 1_2 are dropped).
    assert docs[0] == "tweets-1" and ex.labels[0] == 1
    first_nyt = ex.keys["domain"].index("nyt")
    assert docs[first_nyt] == "nyt-1"
    assert ex.texts[first_nyt].startswith("It's mainly a holiday celebration")
    tweet_docs = [d for d, dom in zip(docs, ex.keys["domain"], strict=True) if dom == "tweets"]
    assert len(set(tweet_docs)) == len(tweet_docs)  # one document per tweet
    nyt_docs = {d for d, dom in zip(docs, ex.keys["domain"], strict=True) if dom == "nyt"}
    assert len(nyt_docs) < VADER_COUNTS["nyt"]  # several sentences per editorial


def test_vader_threshold_zero_keeps_more(vader_root: Path) -> None:
    assert len(load_vader(vader_root, ["amazon"], threshold=0.0)) > VADER_COUNTS["amazon"]


def test_vader_bad_arguments(vader_root: Path) -> None:
    with pytest.raises(DataError, match="unknown VADER domains"):
        load_vader(vader_root, ["reddit"])
    with pytest.raises(DataError, match="threshold"):
        load_vader(vader_root, ["nyt"], threshold=4.5)


def test_natural_partition_by_domain(vader_root: Path) -> None:
    cfg = DataConfig(cache_dir=vader_root, partition="natural", natural_key="domain")
    data = build_federated_data(cfg)
    assert [c.name for c in data.clients] == ["amazon", "movie", "nyt", "tweets"]
    assert data.num_labels == 2
    total = len(data.server_test)
    for client in data.clients:
        size = len(client.train) + len(client.test)
        total += size
        assert set(client.train.keys["domain"]) == {client.name}
        # The server holds out 10 % at random, so each domain keeps roughly 90 % of its rows.
        assert 0.85 * VADER_COUNTS[client.name] < size < 0.95 * VADER_COUNTS[client.name]
    assert total == 19_136
    assert len(data.server_test) == round(0.1 * 19_136)

    # Before the server hold-out, the natural parts are exactly the domains.
    whole = load_vader(vader_root)
    names, parts = natural_partition(whole.keys["domain"])
    assert dict(zip(names, [p.size for p in parts], strict=True)) == VADER_COUNTS


def test_natural_partition_by_document(vader_root: Path) -> None:
    cfg = DataConfig(
        cache_dir=vader_root,
        partition="natural",
        natural_key="document",
        vader_domains=["amazon"],
        client_test_fraction=0.0,
    )
    data = build_federated_data(cfg)
    assert all(c.name.startswith("amazon-") for c in data.clients)
    assert len(data.clients) < VADER_COUNTS["amazon"]
    assert sum(len(c.train) for c in data.clients) + len(data.server_test) == VADER_COUNTS["amazon"]


def test_resolve_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRIVET_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "cfg") == tmp_path / "cfg"  # the config wins
    monkeypatch.delenv("PRIVET_CACHE_DIR")
    assert "privet" in resolve_cache_dir().parts


# --- the download and extraction paths, without the network --------------------------------------


def test_pip_retries_then_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None
) -> None:
    calls: list[list[str]] = []

    def failing(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable")

    monkeypatch.setattr(subprocess, "run", failing)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(DataError, match="after 3 tries: ERROR: network unreachable"):
        fetch_vader(tmp_path)
    assert len(calls) == 3
    assert calls[0][1:4] == ["-m", "pip", "download"]
    req = Path(calls[0][calls[0].index("-r") + 1])
    assert not req.exists()  # the temporary download folder is cleaned up


def test_pip_hash_mismatch_stops_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None
) -> None:
    calls = 0

    def tampered(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        nonlocal calls
        calls += 1
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES"
        )

    monkeypatch.setattr(subprocess, "run", tampered)
    with pytest.raises(DataError, match="does not match the pinned"):
        fetch_vader(tmp_path)
    assert calls == 1


def _tar_gz(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _fake_sdist(path: Path, inner_members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    inner = _tar_gz(inner_members)
    path.write_bytes(
        _tar_gz([_file("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner)])
    )
    return path


def test_extraction_ignores_traversal_members(tmp_path: Path) -> None:
    members = [_file(f"hutto_ICWSM_2014/{name}", b"1\t2.0\tgood\r\n") for name in FILES]
    members.append(_file("../../evil.txt", b"pwned"))
    members.append(_file("/evil-abs.txt", b"pwned"))
    sdist = _fake_sdist(tmp_path / "fake.tar.gz", members)
    dest = tmp_path / "out" / "deep"
    dest.mkdir(parents=True)
    hashes = vader_module._extract_ground_truth(sdist, dest)
    assert sorted(hashes) == FILES
    assert sorted(p.name for p in dest.iterdir()) == FILES
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_extraction_refuses_links(tmp_path: Path) -> None:
    members = [_file(f"hutto_ICWSM_2014/{name}", b"x") for name in FILES[1:]]
    link = tarfile.TarInfo(f"hutto_ICWSM_2014/{FILES[0]}")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    members.append((link, None))
    sdist = _fake_sdist(tmp_path / "fake.tar.gz", members)
    with pytest.raises(DataError, match="not a regular file"):
        vader_module._extract_ground_truth(sdist, tmp_path)


def test_extraction_of_garbage(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a usable vaderSentiment"):
        vader_module._extract_ground_truth(junk, tmp_path)
