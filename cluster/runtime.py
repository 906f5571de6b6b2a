"""Connecting to Ray: a local instance by default, a cluster when an address is given."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("taskray")


def ray_address(explicit: str | None = None) -> str | None:
    """The cluster address to use: ``--address``/config first, then ``RAY_ADDRESS``."""
    return explicit or os.environ.get("RAY_ADDRESS") or None


def connect(
    address: str | None = None, num_cpus: int | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Initialise Ray once per process and describe what it connected to.

    Without an address a local instance starts with ``num_cpus`` (default: this machine's
    cores); with one, the driver joins that cluster. Token authentication stays as Ray sets it.
    """
    import ray

    address = ray_address(address)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": not quiet}
        if address:
            ray.init(address=address, **kwargs)
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
            kwargs["include_dashboard"] = False
            ray.init(**kwargs)
    resources = ray.cluster_resources()
    return {"address": address or "local", "resources": resources}
