"""``privet export``, ``privet report`` and ``privet runs``: what a person does with finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["export_cmd", "report_cmd", "runs_cmd"]

console = Console()

RunDirArg = Annotated[
    Path,
    typer.Argument(help="A run directory (runs/<name>).", exists=True, file_okay=False),
]


def export_cmd(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (new or empty).")],
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Merge the adapter into the base weights: a standalone transformers folder (default).",
        ),
    ] = False,
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only", help="Write the PEFT adapter folder (plus tokenizer) instead."
        ),
    ] = False,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Comma-separated label names in label order (default: the data source's names).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the contents of a non-empty --out.")
    ] = False,
) -> None:
    """Export a run's final model for transformers.pipeline (merged) or PEFT (adapter only)."""
    if merge and adapter_only:
        raise typer.BadParameter("give --merge or --adapter-only, not both")
    from privet.server.rundir.export import export_run

    names = [s.strip() for s in labels.split(",")] if labels else None
    with console.status("loading the base model and the final adapter"):
        res = export_run(run_dir, out=out, merge=not adapter_only, labels=names, overwrite=force)
    if not res.merged:
        console.print(
            f"PEFT adapter written to {res.out}: PeftModel.from_pretrained(base, {str(res.out)!r})"
        )
        return
    trust = ", trust_remote_code=True" if res.needs_trust_remote_code else ""
    labelled = f" (labels: {res.id2label})" if res.id2label else ""
    console.print(f"merged model written to {res.out}{labelled}")
    console.print(
        f'load it: pipeline("{res.pipeline}", model={str(res.out)!r}{trust})', highlight=False
    )
    if res.needs_trust_remote_code:
        console.print(
            "the run pooled by masked mean (sentence-transformers style); the folder carries that "
            "model class in modeling_privet_bert.py, hence trust_remote_code=True",
            highlight=False,
        )


def report_cmd(
    run_dir: RunDirArg,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Where to write report.html (default: RUN_DIR/report.html)."
        ),
    ] = None,
) -> None:
    """Write a self-contained HTML report of a run (plots, config, privacy) and its PNGs."""
    from privet.server.rundir.html_report import write_report

    path = write_report(run_dir, out=out)
    console.print(f"report: {path}")
    console.print(f"plots:  {path.with_name(path.stem + '-plots')}/")


def runs_cmd(
    output_dir: Annotated[
        Path,
        typer.Argument(help="The folder holding run directories (simulation.output_dir)."),
    ] = Path("runs"),
) -> None:
    """List the runs in OUTPUT_DIR with their final metrics."""
    from privet.server.rundir.runs import find_runs, runs_table

    runs = find_runs(output_dir)
    if not runs:
        console.print(f"no runs in {output_dir}")
        return
    console.print(runs_table(runs, width=console.width))
