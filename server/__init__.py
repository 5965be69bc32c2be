"""privet's coordinator: the ServerApp, its strategy wrapper and the run directory."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privet.server.app import make_server_app
    from privet.server.loop import run_rounds
    from privet.server.recording import RecordingStrategy, RoundObserver, RoundRecord
    from privet.server.rundir import (
        create_run_dir,
        load_checkpoint,
        read_metrics,
        save_checkpoint,
    )
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


# Each public name and the module that defines it. The modules import torch and Flower; loading
# them on first use keeps light tools (`privet runs`, `privet report`) from paying seconds of
# imports they never use.
_WHERE = {
    "make_server_app": "app",
    "run_rounds": "loop",
    "RecordingStrategy": "recording",
    "RoundObserver": "recording",
    "RoundRecord": "recording",
    "create_run_dir": "rundir",
    "load_checkpoint": "rundir",
    "read_metrics": "rundir",
    "save_checkpoint": "rundir",
    "build_strategy": "strategies",
    "make_reply_checks": "validation",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"privet.server.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'privet.server' has no attribute {name!r}")
