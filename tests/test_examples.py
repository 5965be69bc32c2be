"""The runnable examples run, and a host application's stderr stays quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_locally_runs_with_a_quiet_stderr() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_locally.py"), "--layers", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ε spent 7.9" in done.stdout, done.stdout
    # No "Loading weights" bar, no transformers FutureWarning, no Opacus/torch hook warning:
    # a partner's application gets privet's training without noise on its stderr.
    assert done.stderr == "", done.stderr


def test_demo_config_is_the_readme_config() -> None:
    from privet.common.config import load_config

    demo = load_config(ROOT / "examples" / "demo.toml", [])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("```toml\n", readme.index("A config file is TOML")) + len("```toml\n")
    block = readme[start : readme.index("```", start)]
    # README's `privet plan --config examples/demo.toml` names this file: same settings.
    assert block in (ROOT / "examples" / "demo.toml").read_text(encoding="utf-8")
    assert demo.federation.rounds == 3 and demo.data.num_clients == 4
