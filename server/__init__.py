"""privet's coordinator: the ServerApp, its strategy wrapper and the run directory."""

from privet.server.app import make_server_app
from privet.server.loop import run_rounds
from privet.server.recording import RecordingStrategy, RoundObserver, RoundRecord
from privet.server.rundir import create_run_dir, load_checkpoint, read_metrics, save_checkpoint
from privet.server.strategies import build_strategy
from privet.server.validation import make_reply_checks

__all__ = [
    "RecordingStrategy",
    "RoundObserver",
    "RoundRecord",
    "build_strategy",
    "create_run_dir",
    "load_checkpoint",
    "make_reply_checks",
    "make_server_app",
    "read_metrics",
    "run_rounds",
    "save_checkpoint",
]
