"""The runnable examples run, and a host application's stderr stays quiet."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", ["llm_shakespeare", "llm_sentiment"])
def test_llm_presets_plan_a_dp_federation_of_smollm2(name: str) -> None:
    # The documented generative presets (docs/llm.md) validate and plan: DP at ε = 8 per client,
    # every budget holding, and the plan names the privacy unit of a causal LM. (Their real runs,
    # 3 to 9 minutes each on 2 CPU cores, are measured in docs/llm.md, not repeated here.)
    from rich.console import Console

    from privet.common.config import load_config
    from privet.simulations.plan import make_plan, render_plan

    path = ROOT / "examples" / f"{name}.toml"
    cfg = load_config(path, [])
    assert cfg.model.task == "causal_lm" and cfg.model.name == "embedded:SmolLM2-135M-Instruct"
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 8.0
    # The header states the full-size commands, and each one's --set overrides are valid together.
    text = path.read_text(encoding="utf-8")
    commands = re.findall(r"^#\s+privet simulate (.*?)(?<!\\)$", text.replace("\\\n#", " "), re.M)
    assert commands
    for command in commands:
        words = shlex.split(command.replace("\\", " "))
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert sets and load_config(path, sets).model.task == "causal_lm", command
    plan = make_plan(cfg, with_model=False)
    assert not plan.problems
    assert all(c.epsilon_planned is not None and c.epsilon_planned <= 8.0 for c in plan.clients)
    console = Console(width=200, record=True)
    console.print(render_plan(plan, cfg))
    assert "privacy unit of sample-level DP: one example = one sequence" in console.export_text()
    assert "one chat" in plan.as_json()["privacy_unit"]
