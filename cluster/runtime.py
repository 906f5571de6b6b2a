"""Connecting to Ray: a local instance by default, a cluster when an address is given."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("taskray")


def ray_address(explicit: str | None = None) -> str | None:
    """The cluster address to use: ``--address``/config first, then ``RAY_ADDRESS``."""
    return explicit or os.environ.get("RAY_ADDRESS") or None


#: Seconds a command waits to join an existing cluster before it gives up with one line.
CONNECT_TIMEOUT_S = float(os.environ.get("TASKRAY_CONNECT_TIMEOUT_S", "30"))


class ClusterUnavailable(RuntimeError):
    """The Ray cluster a command should join is not there, or did not answer in time
    (``timed_out``: something answers at the address but never finished the handshake)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def join(address: str, **kwargs: Any) -> None:
    """``ray.init(address=...)`` bounded by :data:`CONNECT_TIMEOUT_S`, with a one-line error.

    A cluster whose head is dead or going down makes ``ray.init`` retry for minutes; after the
    bound the command says so instead of hanging (and SIGTERM still reaches it meanwhile).
    """
    import ray

    from cluster import lifecycle

    try:
        lifecycle.bounded(lambda: ray.init(address=address, **kwargs), CONNECT_TIMEOUT_S,
                          "connecting to Ray")  # fmt: skip
    except TimeoutError:
        raise ClusterUnavailable(
            f"the Ray cluster at {address!r} did not answer within {CONNECT_TIMEOUT_S:.0f}s "
            "(it may be stopped or shutting down): check `ray status`, or wait and retry; "
            "TASKRAY_CONNECT_TIMEOUT_S sets the bound",
            timed_out=True,
        ) from None
    except (ConnectionError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or ["no running cluster"])[0]
        raise ClusterUnavailable(f"cannot connect to Ray at {address!r}: {first}") from None
    lifecycle.install()


def connect(
    address: str | None = None, num_cpus: int | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Initialise Ray once per process and describe what it connected to.

    Without an address a local instance starts with ``num_cpus`` (default: this machine's
    cores); with one, the driver joins that cluster (bounded, see :func:`join`). Token
    authentication stays as Ray sets it. SIGTERM is routed to a clean stop afterwards
    (``ray.init`` installs a handler that aborts).
    """
    import ray

    from cluster import lifecycle
    from cluster.console import quiet_ray_loggers, ray_logs_dir, verbose

    address = ray_address(address)
    if not ray.is_initialized():
        loud = verbose()
        # Quiet by default: workers' output and Ray's INFO lines stay in Ray's log files, and
        # taskray's own lines reach the console once each (cluster.console).
        kwargs: dict[str, Any] = {
            "log_to_driver": loud,
            "configure_logging": not quiet,
            "logging_level": logging.INFO if loud else logging.WARNING,
        }
        if address:
            join(address, **kwargs)
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
            kwargs["include_dashboard"] = False
            ray.init(**kwargs)
            lifecycle.install()
        if not loud:
            quiet_ray_loggers()
        logs = ray_logs_dir()
        if not loud and not quiet and logs:
            print(f"[taskray] Ray's logs: {logs} (--verbose shows them here)", flush=True)
    resources = ray.cluster_resources()
    return {"address": address or "local", "resources": resources}
