"""privet's coordinator: the ServerApp, its strategy wrapper and the run directory."""

from privet.server.app import RoundObserver, RoundRecord, TrackingFedAvg, make_server_app
from privet.server.rundir import create_run_dir, load_checkpoint, read_metrics, save_checkpoint

__all__ = [
    "RoundObserver",
    "RoundRecord",
    "TrackingFedAvg",
    "create_run_dir",
    "load_checkpoint",
    "make_server_app",
    "read_metrics",
    "save_checkpoint",
]
