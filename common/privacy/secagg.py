"""What the two halves of secure aggregation (``privet.server.secagg``, ``privet.client.secagg``) share."""

from __future__ import annotations

import math

from privet.common.config import SecureAggregationConfig

__all__ = ["SECAGG_RECORD", "quantization_slack"]

#: The config record privet adds to a SecAgg+ train message: how the client weights its update.
SECAGG_RECORD = "privet.secagg"


def quantization_slack(num_params: int, sa: SecureAggregationConfig) -> float:
    """Bound on the L2 distance between a client's weights and what SecAgg+ sums for them.

    Flower's stochastic rounding moves each weight by less than one level,
    ``2 * clipping_range / quantization_range``; over ``num_params`` weights the L2 error is below
    ``sqrt(num_params)`` times that (for a weight of 1, as with client-level DP).
    """
    return math.sqrt(num_params) * 2.0 * sa.clipping_range / sa.quantization_range
