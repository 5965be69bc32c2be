"""What every ``privet`` command prints the same way: quiet libraries, the privacy banner, signals.

The commands live beside the role they start (``privet server`` in ``privet.server.cli``, ``privet
client`` in ``privet.client.cli``, ``privet simulate`` in ``privet.simulations.cli``); what they
share is here, so no role's command imports another's.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from rich.console import Console

from privet.common.config import PrivetConfig

__all__ = ["INSECURE_WARNING", "announce_privacy", "quiet_libraries", "sigterm_as_interrupt"]

INSECURE_WARNING = (
    "[bold red]--insecure:[/bold red] [red]no TLS and no node authentication; anyone who reaches "
    "this port can read the updates or join. Use it only for local trials.[/red]"
)


def sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind like Ctrl-C, so every child process is stopped (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def quiet_libraries(verbose: bool) -> None:
    """Keep library warnings and progress bars off the console unless ``verbose``."""
    # Library warnings and download bars bury the per-round table a user reads.
    if verbose:
        return
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def announce_privacy(cfg: PrivetConfig, console: Console) -> None:
    """Say in one line whether DP is on, and how (printed before any run starts)."""
    p = cfg.privacy
    if not p.enabled:
        console.print(
            "[bold red on white] DIFFERENTIAL PRIVACY IS OFF [/bold red on white] [red]clients' updates "
            "carry no privacy guarantee; use this only for non-private baselines.[/red]"
        )
    else:
        how = (
            f"target ε = {p.target_epsilon}"
            if p.target_epsilon is not None
            else f"noise σ = {p.noise_multiplier}"
        )
        console.print(
            f"[bold]DP-SGD on[/bold]: sample-level ({how}, δ = {p.delta}, clip C = {p.max_grad_norm}, "
            f"{p.accountant.upper()} accountant, budget ε ≤ {p.effective_budget} per client)"
        )
