"""``make mutants``: mutation testing of the privacy-critical code with mutmut.

Usage::

    python tests/mutation.py [MODULE ...]        # default: DEFAULT_MODULES
    MUTANT_TESTS="tests/test_x.py" python tests/mutation.py common/privacy/ledger.py

mutmut makes every mutant of the modules (an operator swapped, a number or a string changed, a
condition negated, ...) and runs, for each, the tests that call the mutated function; a mutant no
test notices *survives*.  docs/testing.md keeps the scores and explains every survivor.

Why a scratch tree: mutmut names a mutant after its file's path (``privet/common/privacy/ledger.py``
must be ``privet.common.privacy.ledger``) and runs the tests against a copy in ``mutants/``, while
privet's packages live in top-level folders mapped onto ``privet.*`` by
``[tool.setuptools.package-dir]`` and the strict editable install would import the originals.  So
the tracked files are laid out the conventional way under ``.mutants/tree/privet/...`` (never in
the checkout: an interrupted run, a commit or an editor must never see a mutant), mutmut's own
``mutants/`` copy goes first on ``sys.path``, and ``privet`` being a namespace package, its
subpackages are found there.  mutmut forks one process per mutant from a process that has already
imported everything, so a mutant costs its tests' time only (about 0.3 s here), not an interpreter
start with torch and Opacus.
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
#: Where the scratch copy and the results go (``MUTANT_WORK`` lets two runs stand side by side).
WORK = ROOT / os.environ.get("MUTANT_WORK", ".mutants")
TREE = WORK / "tree"
BIN = Path(sys.executable).parent

#: The privacy-critical modules and the tests that hold each one.  mutmut runs, per mutant, only
#: those of the selected tests that call the mutated function, so a module lists every fast test
#: module that calls it (found with coverage's per-test contexts; ``slow`` tests are left out by
#: the ``-m "not slow"`` below).  End-to-end federations that are not marked ``slow``
#: (``tests/test_named_labels.py``'s run also calls the client-level wrapper and writes the
#: privacy report) are not listed: each would run a whole federation for every mutant of those
#: functions, and unit tests hold the same paths with exact numbers.
TESTS: dict[str, list[str]] = {
    "common/privacy/ledger.py": ["tests/test_privacy_ledger.py"],
    "common/privacy/accounting.py": ["tests/test_privacy_accounting.py"],
    "common/privacy/mechanism.py": ["tests/test_privacy_arithmetic.py"],
    "common/privacy/federation.py": [
        "tests/test_plan.py",
        "tests/test_privacy_arithmetic.py",
        "tests/test_privacy_client_level.py",
        "tests/test_privacy_mechanism.py",
        "tests/test_resume_state.py",
    ],
    "client/bookkeeping.py": ["tests/test_bookkeeping.py"],
    "client/training.py": [
        "tests/test_privacy_mechanism.py",
        "tests/test_training.py",
        "tests/test_ghost_clipping.py",
    ],
    "client/client_level.py": [
        "tests/test_faults.py",
        "tests/test_privacy_client_level.py",
        "tests/test_security_site_policy.py",
        "tests/test_transport.py",
    ],
    "server/privacy.py": ["tests/test_privacy_client_level.py", "tests/test_resume_state.py"],
    "client/privacy.py": ["tests/test_privacy_arithmetic.py", "tests/test_llm_readout_center.py"],
    "server/rundir/privacy_report.py": [
        "tests/test_privacy_arithmetic.py",
        "tests/test_privacy_client_level.py",
        "tests/test_privacy_ledger.py",
        "tests/test_protocol.py",
        "tests/test_security_site_policy.py",
    ],
}
#: Every pytest run of mutmut's: ``slow`` tests (end-to-end runs) would cost tens of seconds per
#: mutant.
PYTEST_ARGS = ["-p", "no:randomly", "-p", "no:cacheprovider", "-n", "0", "-m", "not slow"]
DEFAULT_MODULES = [
    "common/privacy/mechanism.py",
    "common/privacy/ledger.py",
    "common/privacy/accounting.py",
]


def _copy_tree(package_dirs: dict[str, str]) -> None:
    """Lay the tracked (and new, unignored) files out under TREE as ``privet/<package>/...``."""
    if TREE.exists():
        shutil.rmtree(TREE)
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    # Longest folder first, so privet.simulations.studies is not mistaken for privet.simulations.
    folders = sorted(package_dirs.items(), key=lambda kv: -len(kv[1]))
    for rel in files:
        src = ROOT / rel
        if not src.is_file():
            continue
        dst = TREE / rel
        for package, folder in folders:
            if rel.startswith(folder + "/"):
                dst = TREE / Path(*package.split(".")) / rel[len(folder) + 1 :]
                break
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _mapped(module: str, package_dirs: dict[str, str]) -> str:
    """``common/privacy/ledger.py`` -> ``privet/common/privacy/ledger.py``."""
    for package, folder in sorted(package_dirs.items(), key=lambda kv: -len(kv[1])):
        if module.startswith(folder + "/"):
            return "/".join([*package.split("."), module[len(folder) + 1 :]])
    raise SystemExit(f"{module} is in no privet package ({', '.join(package_dirs.values())})")


def main(modules: list[str]) -> int:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    tests = os.environ.get("MUTANT_TESTS", "").split()
    if not tests:
        unknown = [m for m in modules if m not in TESTS]
        if unknown:
            print(f"no tests known for {unknown}: set MUTANT_TESTS", file=sys.stderr)
            return 2
        tests = sorted({t for m in modules for t in TESTS[m]})
    mapped = [_mapped(m, package_dirs) for m in modules]
    WORK.mkdir(exist_ok=True)
    _copy_tree(package_dirs)
    config = {
        "source_paths": sorted({str(Path(m).parent) for m in mapped}),
        "only_mutate": mapped,
        "also_copy": ["privet"],
        "pytest_add_cli_args": PYTEST_ARGS,
        "pytest_add_cli_args_test_selection": tests,
        "use_git_change_detection": False,
    }
    section = "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    with (TREE / "pyproject.toml").open("a") as fh:
        fh.write(section)
    # One thread per process: mutmut forks each mutant from a process whose tests have already run
    # torch ops, and a child that inherits a started OpenMP pool hangs on its first parallel op
    # (every mutant of a torch-training module then "timed out" after 300 s, at 0 CPU seconds).
    # Without worker threads there is no pool to inherit; the machine is shared anyway.
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
    }
    start = time.monotonic()
    # One child at a time: the machine is shared (make mutants runs under nice as well).
    run = subprocess.run(
        [str(BIN / "mutmut"), "run", "--max-children", os.environ.get("MUTANT_CHILDREN", "1")],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
    )
    minutes = (time.monotonic() - start) / 60
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
        return run.returncode
    results = subprocess.run(
        [str(BIN / "mutmut"), "results", "--all", "true"],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (WORK / "results.txt").write_text(results)
    status = [line.rsplit(": ", 1)[-1].strip() for line in results.splitlines() if ": " in line]
    killed, survived = status.count("killed"), status.count("survived")
    total = len(status)
    score = 100.0 * killed / total if total else 0.0
    print(
        f"mutants: {total}, killed {killed}, survived {survived}, other {total - killed - survived}"
        f" (score {score:.1f} %) in {minutes:.1f} min"
    )
    by_status: dict[str, int] = {}
    for line in results.splitlines():
        if ": " in line:
            name, _, what = line.strip().rpartition(": ")
            module = name.split(".x", 1)[0]
            by_status[f"{module} {what}"] = by_status.get(f"{module} {what}", 0) + 1
    for key, count in sorted(by_status.items()):
        print(f"  {key}: {count}")
    for line in results.splitlines():
        if line.rstrip().endswith(("survived", "no tests", "timeout", "suspicious")):
            print(line.strip())
    print(f"show one: cd {WORK.name}/tree && ../../.venv/bin/mutmut show <name>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:] or DEFAULT_MODULES))
