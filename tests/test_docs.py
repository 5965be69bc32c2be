"""Docs that run: every shell and Python block in README.md and docs/ is executed, in order.

A block that cannot run in a test (it starts a server, needs a cluster, runs the whole test suite)
carries a marker on the line before its fence, with the reason::

    <!-- not-run: starts a web server that runs until stopped -->

Blocks of one file run in file order in one scratch folder (``.venv`` there points at this
interpreter's environment), so a later block can use what an earlier one made: a run directory, an
exported model. ``privet simulate`` gets small overrides appended (later ``--set`` wins) so that a
documented federation finishes in seconds: a one-layer cut, few examples, one round, and the
in-process engine (the same apps without Ray's start-up; the Ray path has its own end-to-end
tests). Everything else runs as written. TOML blocks that look
like a privet config are validated against the config models.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from privet.common.config import PrivetConfig, load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py", "python3"}
MARKER = re.compile(r"^<!--\s*not-run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
# Appended to every `privet simulate` line: a small, quick federation of the same kind.
TINY_SIMULATE = (  # each item is " --set key=value"
    " --set model.num_hidden_layers=1 --set model.max_length=32 --set data.max_examples=400"
    " --set data.num_clients=2"
    " --set federation.rounds=1 --set train.local_epochs=0.5 --set train.batch_size=32"
    " --set simulation.cpus_per_client=1 --set simulation.engine=inprocess"
)
BLOCK_TIMEOUT = 600


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a Markdown file, each with the not-run reason on the line before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m["fence"], (m["info"].split() or [""])[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(prev)
        reason = marker["reason"] if marker else None
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", reason))
        i += 1
    return blocks


def _shrink(code: str) -> str:
    """Append the small-federation overrides to each `privet simulate`, except keys it sets itself."""
    code = re.sub(r"\\\n\s*", " ", code)  # join continued lines first
    out = []
    for line in code.splitlines():
        command, sep, comment = line.partition("  #")
        if re.search(r"\bprivet simulate\b", command) and "--help" not in command:
            given = set(re.findall(r"--set\s+([\w.]+)=", command))
            extra = "".join(
                f" --set {item}"
                for item in TINY_SIMULATE.split(" --set ")[1:]
                if item.split("=")[0] not in given
            )
            line = command.rstrip() + extra + (f"  #{comment}" if sep else "")
        out.append(line)
    return "\n".join(out) + "\n"


def _end_group(proc: subprocess.Popen[str]) -> None:
    """SIGINT the block's process group (privet then stops its Ray workers), SIGKILL what is left."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(block: Block, workdir: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "160",
    }
    if block.lang in PYTHON:
        script = workdir / f"block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    else:
        script = workdir / f"block_{block.line}.sh"
        script.write_text(_shrink(block.code), encoding="utf-8")
        cmd = ["bash", "-euo", "pipefail", str(script)]
    t0 = time.perf_counter()
    # Own session: on a timeout the whole block (privet, its Ray workers) is ended, not just bash.
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        pytest.fail(f"{block.where}: the block ran past {BLOCK_TIMEOUT} s", pytrace=False)
    finally:
        if proc.poll() is None:
            _end_group(proc)
    print(f"{block.where}: {time.perf_counter() - t0:.1f} s")
    if proc.returncode != 0:
        pytest.fail(
            f"{block.where}: the {block.lang} block exits with {proc.returncode}.\n"
            f"--- block (as run) ---\n{script.read_text()}"
            f"--- stdout (end) ---\n{stdout[-3000:]}\n--- stderr (end) ---\n{stderr[-3000:]}\n"
            "Fix the doc, or put `<!-- not-run: reason -->` on the line before its fence.",
            pytrace=False,
        )


def _is_privet_config(data: dict[str, object]) -> bool:
    return bool(data) and set(data) <= set(PrivetConfig.model_fields)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_blocks_run(doc: Path, tmp_path: Path) -> None:
    blocks = parse_blocks(doc)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    ran = 0
    for block in blocks:
        if block.skip_reason is not None:
            assert block.skip_reason, f"{block.where}: a not-run marker needs a reason"
            continue
        if block.lang in ("toml",):
            data = tomllib.loads(block.code)
            if _is_privet_config(data):
                cfg_path = tmp_path / f"block_{block.line}.toml"
                cfg_path.write_text(block.code, encoding="utf-8")
                load_config(cfg_path)  # a renamed or mistyped field fails here
            continue
        if block.lang in SHELL | PYTHON:
            _run(block, tmp_path)
            ran += 1
    print(f"{doc.name}: ran {ran} block(s)")


def test_parser_and_markers(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n```bash\necho one\n```\n\n<!-- not-run: starts a server -->\n\n````python\n"
        "print('```')\n````\n\n```toml\n[train]\nlr = 0.1\n```\n"
    )
    blocks = parse_blocks(md)
    assert [(b.lang, b.line, b.skip_reason) for b in blocks] == [
        ("bash", 3, None),
        ("python", 9, "starts a server"),
        ("toml", 13, None),
    ]
    assert blocks[1].code == "print('```')\n"
    assert _shrink(".venv/bin/privet simulate --set a.b=1  # the demo\n") == (
        f".venv/bin/privet simulate --set a.b=1{TINY_SIMULATE}  # the demo\n"
    )
    assert _shrink("privet simulate --help\n") == "privet simulate --help\n"
    # a key the doc sets keeps the doc's value; continued lines are joined
    shrunk = _shrink("privet simulate --set data.num_clients=5 \\\n  --set federation.rounds=3\n")
    assert shrunk.count("\n") == 1
    assert "data.num_clients=5" in shrunk and "data.num_clients=2" not in shrunk
    assert "federation.rounds=3" in shrunk and "federation.rounds=1" not in shrunk
    assert "model.num_hidden_layers=1" in shrunk


def test_the_architecture_map_names_every_module() -> None:
    # docs/architecture.md drifted once (modules moved or added without a row); every module of
    # the four packages must have a row, itself or through its folder's row (e.g. `common/data/`).
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.M))
    folders = tuple(r for r in rows if r.endswith("/"))
    missing = []
    for folder in ("common", "client", "server", "simulations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" and rel not in rows:
                continue
            if rel not in rows and not rel.startswith(folders):
                missing.append(rel)
    assert not missing, f"docs/architecture.md has no row for {missing}"
    stale = [r for r in rows - set(folders) if r.endswith(".py") and not (ROOT / r).is_file()]
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
