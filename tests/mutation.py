"""``make mutants``: mutation testing of the privacy-critical code with cosmic-ray.

Usage::

    python tests/mutation.py [MODULE ...]        # default: DEFAULT_MODULES
    MUTANT_TESTS="tests/test_x.py" python tests/mutation.py common/privacy/ledger.py

For each module, cosmic-ray makes every mutant (an operator swapped, a number changed, a condition
negated, ...) and runs that module's tests against it; a mutant the tests do not notice *survives*.
docs/testing.md keeps the scores and explains every survivor.

The work happens in a scratch copy of the tracked files (``.mutants/tree``), never in the checkout:
cosmic-ray rewrites the file it mutates in place, and an interrupted run, a commit or an editor in
the checkout must never see a mutant.  privet's packages live in top-level folders mapped onto
``privet.*`` (``[tool.setuptools.package-dir]``), so the copy gets a ``privet/`` folder of symlinks
to its own folders and goes first on ``PYTHONPATH``: ``import privet.common`` then finds the copy
(``privet`` is a namespace package, and ``PYTHONPATH`` precedes the editable install's path).
Each module's session is kept (``.mutants/<module>.sqlite``), so a second run resumes where an
interrupted one stopped; ``MUTANT_FRESH=1`` starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutants"
TREE = WORK / "tree"
BIN = Path(sys.executable).parent

#: The privacy-critical modules and the tests that hold each one (the mutants of a module run
#: only its own tests: the whole suite per mutant would take days on two cores).
TESTS: dict[str, list[str]] = {
    "common/privacy/ledger.py": ["tests/test_privacy_ledger.py"],
    "common/privacy/accounting.py": ["tests/test_privacy_accounting.py"],
    "common/privacy/mechanism.py": ["tests/test_privacy_arithmetic.py"],
    "common/privacy/federation.py": [
        "tests/test_privacy_arithmetic.py",
        "tests/test_privacy_client_level.py",
    ],
    "client/bookkeeping.py": ["tests/test_bookkeeping.py"],
    "client/training.py": [
        "tests/test_privacy_mechanism.py",
        "tests/test_training.py",
        "tests/test_ghost_clipping.py",
    ],
    "client/client_level.py": ["tests/test_privacy_client_level.py", "tests/test_strategies.py"],
    "server/privacy.py": ["tests/test_privacy_client_level.py"],
}
DEFAULT_MODULES = [
    "common/privacy/mechanism.py",
    "common/privacy/ledger.py",
    "common/privacy/accounting.py",
]

#: Operators left out: swaps to bitwise, shift, power, modulo and floor-division operators (in this
#: floating-point code each is a louder version of the +, -, *, / swaps that are kept), identity
#: comparisons against numbers, and cosmic-ray's random variable insertions.
EXCLUDED_OPERATORS = [
    "core/ReplaceBinaryOperator_.*_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|FloorDiv)",
    "core/ReplaceBinaryOperator_(BitAnd|BitOr|BitXor|LShift|RShift|Pow|Mod|FloorDiv)_.*",
    "core/ReplaceComparisonOperator_.*_(Is|IsNot)",
    "core/ReplaceUnaryOperator_.*_(Delete|Invert)",
    "core/Variable.*",
]


def _copy_tree() -> None:
    """Copy the tracked (and new, unignored) files into TREE and map ``privet.*`` onto them."""
    if TREE.exists():
        shutil.rmtree(TREE)
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(".mutants/"):
            dst = TREE / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in dirs.items():
        link = TREE / Path(*package.split("."))
        if not link.parent.exists():
            link.parent.mkdir(parents=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(TREE / folder, link.parent))


def _config(module: str, tests: list[str], timeout: float) -> str:
    command = " ".join(
        [
            str(BIN / "python"),
            "-B",  # no stale .pyc of an earlier mutant
            "-m pytest -x -q -n 0 -p no:randomly -p no:cacheprovider",
            *tests,
        ]
    )
    excluded = ", ".join(json.dumps(e) for e in EXCLUDED_OPERATORS)
    return "\n".join(
        [
            "[cosmic-ray]",
            f"module-path = {json.dumps(module)}",
            f"timeout = {timeout}",
            "excluded-modules = []",
            f"test-command = {json.dumps(command)}",
            "[cosmic-ray.distributor]",
            'name = "local"',
            "[cosmic-ray.filters.operators-filter]",
            f"exclude-operators = [{excluded}]",
            "",
        ]
    )


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(TREE), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(args, cwd=TREE, env=env, check=True, capture_output=True, text=True)
    return out.stdout


def main(modules: list[str]) -> int:
    tests_override = os.environ.get("MUTANT_TESTS", "").split()
    timeout = float(os.environ.get("MUTANT_TIMEOUT", "120"))
    fresh = os.environ.get("MUTANT_FRESH") == "1"
    WORK.mkdir(exist_ok=True)
    _copy_tree()
    summary = []
    for module in modules:
        tests = tests_override or TESTS.get(module)
        if not tests:
            print(f"no tests known for {module}: set MUTANT_TESTS", file=sys.stderr)
            return 2
        name = module.replace("/", ".")
        config = WORK / f"{name}.toml"
        session = WORK / f"{name}.sqlite"
        config.write_text(_config(module, tests, timeout))
        if fresh or not session.exists():
            session.unlink(missing_ok=True)
            _run(str(BIN / "cosmic-ray"), "init", str(config), str(session))
            _run(str(BIN / "cr-filter-operators"), str(session), str(config))
        start = time.monotonic()
        _run(str(BIN / "cosmic-ray"), "exec", str(config), str(session))
        minutes = (time.monotonic() - start) / 60
        report = _run(str(BIN / "cr-report"), "--show-pending", str(session))
        (WORK / f"{name}.report.txt").write_text(report)
        tail = [
            line
            for line in report.splitlines()
            if line.startswith(("total", "complete", "surviving"))
        ]
        summary.append(f"{module}: {'; '.join(tail)} ({minutes:.1f} min)")
        print(summary[-1], flush=True)
    print("\n".join(["", "mutation scores (details: .mutants/*.report.txt)", *summary]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or DEFAULT_MODULES))
