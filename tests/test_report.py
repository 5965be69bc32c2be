"""`privet report`: a self-contained HTML page with the run's plots, config and privacy summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from privet.server.rundir.html_report import PLOTS, write_report
from privet.simulations.cli import app

from .rundirs import RECORDS, make_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir, _ = make_run(tmp_path_factory.mktemp("runs"), "hand", adapter=False)
    path = write_report(run_dir)
    return path, path.read_text(encoding="utf-8")


def test_writes_html_and_one_png_per_plot(report) -> None:
    path, page = report
    assert path.name == "report.html"
    pngs = sorted((path.parent / "report-plots").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(PLOTS)
    for p in pngs:
        assert p.read_bytes().startswith(PNG_MAGIC)
    # The same images are inlined: the page needs no file beside it.
    inline = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [name for name, _ in inline] == list(PLOTS)


def test_page_fetches_nothing(report) -> None:
    _, page = report
    assert "<script" not in page
    assert "<link" not in page
    assert "@import" not in page and "url(" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)


def test_numbers_config_and_privacy(report) -> None:
    _, page = report
    # per-round table, from the hand-made records
    for text in ("87.50%", "81.25%", "0.3750", "4,096", "3,072", "untrained"):
        assert text in page, text
    # privacy: each client's last ε, the federation's, the refusal, the settings
    assert "2.2500" in page and "2.7500" in page
    assert "largest cumulative ε among clients = 2.7500" in page
    assert "privacy budget exhausted" in page and "node-7" in page
    assert "δ = 1e-05" in page and "RDP accountant" in page
    # the resolved config, escaped
    assert "[federation]" in page and "num_hidden_layers = 1" in page
    assert "embedded:all-MiniLM-L6-v2" in page


def test_dp_off_and_unfinished_runs(tmp_path: Path) -> None:
    records = [{**r, "epsilon_per_client": {}, "max_epsilon": None} for r in RECORDS[:2]]
    run_dir, _ = make_run(
        tmp_path, "off", extra=["privacy.enabled=false"], records=records, finished=False
    )
    page = write_report(run_dir, out=tmp_path / "x" / "r.html").read_text()
    assert "Differential privacy was OFF" in page
    assert "unfinished (1 of 2 rounds)" in page
    assert (tmp_path / "x" / "r-plots" / "epsilon.png").is_file()


def test_cli_report_and_error_on_a_non_run(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path, "cli", finished=False)
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert (run_dir / "report.html").is_file()
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code != 0
    assert "no config.toml" in str(res.exception)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_renders_in_headless_chromium(report, tmp_path: Path) -> None:
    """The page renders offline and its inline plots show up in the pixels of a screenshot."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed here (apt-get install chromium); CI runs this test")
    path, _ = report
    shot = tmp_path / "report.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1400",
        f"--screenshot={shot}",
        path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC)
    print(f"screenshot: {shot}")
    import matplotlib.image as mpimg

    pixels = (mpimg.imread(str(shot))[..., :3] * 255).round().astype(np.int16)
    assert pixels.shape[:2] == (1400, 1200)
    # matplotlib's first line colour (#1f77b4) appears only if the inline PNGs were decoded.
    blue = np.abs(pixels - np.array([31, 119, 180])).sum(axis=-1) <= 12
    assert blue.sum() > 200, "the plots did not render"
    # and the page is not blank: most pixels white, a fair share not
    assert 0.02 < (pixels.sum(axis=-1) < 700).mean() < 0.9


def test_a_run_stopped_by_the_federation_budget(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path, "stopped", finished=False)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "stopped": "the federation budget would be passed"}\n')
    page = write_report(run_dir).read_text()
    assert "stopped after round 2" in page
    assert "The run stopped early: the federation budget would be passed" in page
    assert page.count('<td class="">untrained</td>') == 1


@pytest.mark.parametrize("exact", [True, False])
def test_a_causal_lm_run_shows_perplexity_its_accuracy_and_privacy_unit(
    tmp_path: Path, exact: bool
) -> None:
    metric = "exact-match" if exact else "token-accuracy"
    records = [
        {
            **r,
            "server_metrics": {"perplexity": 40.0 / (i + 1), metric: r["server_accuracy"]},
            "server_samples": [{"prompt": "Speak", "target": " on", "generated": f"g{i}"}],
        }
        for i, r in enumerate(RECORDS)
    ]
    extra = ["model.task='causal_lm'", "data.source='vader_instructions'"]
    run_dir, _ = make_run(tmp_path, "lm", extra=extra, records=records, adapter=False)
    page = write_report(run_dir).read_text(encoding="utf-8")
    name = "exact match" if exact else "token accuracy"
    # cards: the last and the base model's perplexity, the accuracy under its own name
    assert '<div class="v">13.33</div><div class="k">server perplexity</div>' in page
    assert '<div class="v">40.00</div><div class="k">untrained perplexity</div>' in page
    assert f'<div class="v">87.50%</div><div class="k">server {name}</div>' in page
    # the rounds table
    assert '<th class="">server perplexity</th>' in page and '<td class="">20.00</td>' in page
    assert "server accuracy" not in page
    assert "The privacy unit is one example: one sequence, or one chat" in page
    assert '<td class="l">g0</td>' in page and '<td class="l">g2</td>' in page
