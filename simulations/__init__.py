"""privet's simulation harness: whole federations on one machine, and the ``privet`` command."""

from privet.simulations.run import simulate

__all__ = ["simulate"]
