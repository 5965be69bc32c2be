"""Running a simulation on an existing Ray cluster (``simulation.ray_address``).

Flower's Ray backend hands its ``init_args`` straight to ``ray.init`` (flwr 1.41,
``RayBackend.init_ray``), so the cluster's address goes there. ``ray.init`` refuses resource
settings when it joins a cluster (the cluster owns them), so none are passed. At the end of the run
``ray.shutdown()`` disconnects this driver; the cluster keeps running for the next one.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any
from urllib.parse import urlsplit

from privet.common.errors import ConfigError

__all__ = ["check_ray_address", "ray_cluster_init_args"]


def ray_cluster_init_args(address: str, *, verbose: bool) -> dict[str, Any]:
    """The ``ray.init`` arguments that join the cluster at ``address``."""
    return {
        "address": address,
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
    }


def check_ray_address(address: str, *, timeout: float = 5.0) -> None:
    """Fail fast, with one line, when nothing listens at a ``host:port`` cluster address.

    ``auto`` (find the local cluster) is left to Ray. Without this check a wrong address surfaces
    as Ray's retry loop and then a traceback from inside Flower.

    Raises
    ------
    ConfigError
        When the address is malformed or no server accepts a TCP connection there within
        ``timeout`` seconds.

    """
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(
            f"simulation.ray_address {address!r} is not of the form host:port",
            fix="e.g. 127.0.0.1:6379 (the address `ray start --head` prints), 'auto', or unset it",
        )
    try:
        with contextlib.closing(socket.create_connection((host, port), timeout=timeout)):
            pass
    except OSError as exc:
        raise ConfigError(
            f"simulation.ray_address {address!r}: no Ray cluster answers there ({exc.strerror or exc})",
            fix="start one with `ray start --head --port PORT`, fix the address, or unset "
            "simulation.ray_address to let privet start its own",
        ) from None
