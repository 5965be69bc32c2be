"""privet's simulation harness: whole federations on one machine, and the ``privet`` command."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privet.simulations.run import simulate

__all__ = ["simulate"]


def __getattr__(name: str) -> Any:
    # The harness imports torch, Flower and Ray; the `privet` command imports this package for
    # every subcommand, so the harness loads on first use, not on `privet --help`.
    if name == "simulate":
        from privet.simulations.run import simulate

        return simulate
    raise AttributeError(f"module 'privet.simulations' has no attribute {name!r}")
