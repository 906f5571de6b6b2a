"""`taskray serve`: deploy a Serve config file, wait until it is ready, run or detach."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.config import ConfigError, read_yaml

APP_NAME = "taskray"


class DeployFailed(RuntimeError):
    """The application did not become ready: Serve reported it failed, or the wait ran out."""


def load_serve_config(path: str, port: int | None = None) -> Any:
    """Read a Serve config file, make bundle paths absolute, validate with Serve's schema."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve.config import AppArgs

    data = copy.deepcopy(read_yaml(path))
    if port is not None:
        data.setdefault("http_options", {})["port"] = port
    for app in data.get("applications") or []:
        args = app.get("args") or {}
        if app.get("import_path", "").startswith("serve.app:"):
            try:
                AppArgs.model_validate(args)
            except ValidationError as err:
                first = err.errors()[0]
                loc = ".".join(str(p) for p in first.get("loc", ()))
                raise ConfigError(f"{path}: args.{loc}: {first.get('msg')}") from None
            for model in args.get("models", []):
                model["bundle"] = _local_dir(
                    path, model["bundle"], f"bundle for model '{model.get('name')}'"
                )
                for name, adapter in (model.get("adapters") or {}).items():
                    model["adapters"][name] = _local_dir(path, adapter, f"adapter '{name}'")
            qdrant = (args.get("retrieval") or {}).get("qdrant") or {}
            if qdrant.get("path") and not Path(qdrant["path"]).expanduser().is_absolute():
                qdrant["path"] = str(Path(qdrant["path"]).expanduser().resolve())
    try:
        return ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(f"{path}: {loc}: {first.get('msg')} (Ray Serve config schema)") from None


def _local_dir(config_path: str, value: str, what: str) -> str:
    """A bundle or adapter directory, anchored here when relative (replicas do not run in
    this directory); model names that resolve locally (``tiny:…``, MiniLM) pass through."""
    from actors.modeling import resolve_model_path

    directory = Path(resolve_model_path(value)).expanduser()
    if not directory.is_absolute():
        directory = directory.resolve()
    if not directory.is_dir():
        raise ConfigError(
            f"{config_path}: {what} not found: {directory} "
            "(train one with `taskray train` or fix the path)"
        )
    return str(directory)


def base_url(config: Any) -> str:
    """The URL the proxy listens on."""
    host = config.http_options.host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{config.http_options.port}"


def deploy(config: Any, timeout_s: float = 60.0, progress: Any = print) -> None:
    """Start Serve with the file's HTTP options and submit the applications (as `serve run`).

    A Serve instance that is still shutting down on this cluster (its controller answers, then
    dies) is waited out for up to ``timeout_s``, then reported in one line.
    """
    from ray.exceptions import RayActorError
    from ray.serve._private import api as serve_api

    from cluster.runtime import ClusterUnavailable

    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        try:
            client = serve_api.serve_start(
                http_options=config.http_options.model_dump(),
                proxy_location=config.proxy_location,
            )
            client.deploy_apps(config, _blocking=False)
            return
        except RayActorError:
            if time.monotonic() > deadline:
                raise ClusterUnavailable(
                    f"a previous Serve instance on this cluster is still shutting down after "
                    f"{timeout_s:.0f}s: wait for it, or stop it with `taskray serve --stop`"
                ) from None
            if not said:
                progress("[taskray] a previous Serve instance is shutting down; waiting for it")
                said = True
            time.sleep(1.0)


def wait_ready(url: str, timeout_s: float = 300.0, progress: Any = print) -> float:
    """Poll ``/readyz`` until 200; raise with Serve's own status when it fails or times out."""
    from ray import serve

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        status = serve.status()
        for name, app in status.applications.items():
            shown = str(getattr(app.status, "value", app.status))
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                first = (str(app.message).strip().splitlines() or [""])[0]
                raise DeployFailed(f"application '{name}' {shown}: {first} (the replica logs "
                                   "under Ray's session directory have the details)")  # fmt: skip
            if shown != last:
                last = shown
                progress(f"[taskray] application '{name}': {shown}")
        time.sleep(0.5)
    raise DeployFailed(
        f"{url}/readyz did not answer 200 within {timeout_s:.0f}s (raise --timeout, or check "
        "`serve status`)"
    )


def ensure_cluster(num_cpus: int | None) -> None:
    """Connect to a running local Ray cluster, starting a head node when none runs."""
    from cluster.runtime import ClusterUnavailable, join

    try:
        join("auto", namespace="serve", log_to_driver=False)
        return
    except ClusterUnavailable as err:
        if err.timed_out:
            raise
    cmd = ["ray", "start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_head_env())
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["unknown error"]
        raise ClusterUnavailable(f"could not start a local Ray head: {tail[0]}")
    join("auto", namespace="serve", log_to_driver=False)


def _head_env() -> dict[str, str]:
    """The environment of ``ray start --head``: token authentication on unless RAY_AUTH_MODE
    says otherwise. ``ray start`` (unlike ``ray.init()``) turns it on only when a token exists
    already, so on a fresh machine one is generated first, where Ray looks for it
    (``~/.ray/auth_token``; the command prints it, so its output is kept)."""
    import os

    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"].lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return env
    path = env.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not Path(path).expanduser().is_file():
        subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True,
                       check=True)  # fmt: skip
    return env


def stop_detached(address: str | None = None) -> bool:
    """Shut Serve down on the running cluster (``address``, else ``RAY_ADDRESS``, else the local
    one); False when no cluster runs there. Joining is bounded: a cluster that is dead or
    going down is reported in one line (:class:`cluster.runtime.ClusterUnavailable`)."""
    from ray import serve

    from cluster.runtime import ClusterUnavailable, join, ray_address

    try:
        join(ray_address(address) or "auto", namespace="serve", log_to_driver=False)
    except ClusterUnavailable as err:
        if err.timed_out:
            raise
        return False
    serve.shutdown()
    return True


def drain(grace_s: float, progress: Any = print, poll_s: float = 0.5) -> int:
    """Stop the ingress replicas taking new requests, then wait up to ``grace_s`` for the
    HTTP requests in flight (streams until their last byte) to finish. Returns how many were
    still in flight when the wait ended (0: all finished).

    Serve's own shutdown kills the HTTP proxies at once, so this runs first. A handle call
    reaches one replica of the deployment; the calls repeat until every running ingress
    replica has answered (bounded), as Serve has no broadcast.
    """
    from ray import serve

    try:
        app = serve.status().applications[APP_NAME]
        replicas = max(1, int(app.deployments["Ingress"].replica_states.get("RUNNING", 0)))
    except Exception as err:  # no app to drain (it failed, or never deployed)
        progress(f"[taskray] nothing to drain ({type(err).__name__})")
        return 0
    # One event loop for every handle call: under Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED=1 a
    # handle's router runs on the loop it is first called from, and a call from plain code
    # raises (which the retries below would swallow, leaving the streams to Serve's shutdown).
    return asyncio.run(_drain(replicas, grace_s, progress, poll_s))


async def _drain(replicas: int, grace_s: float, progress: Any, poll_s: float) -> int:
    """``drain``'s calls to the ingress replicas, on one event loop, through a handle of
    its own that is shut down on that loop: ``serve.get_deployment_handle`` would keep it
    in Serve's cache, whose shutdown would then find its loop closed."""
    from ray.serve.handle import DeploymentHandle

    handle = DeploymentHandle("Ingress", APP_NAME)
    try:
        return await _wait_for_in_flight(handle, replicas, grace_s, progress, poll_s)
    finally:
        await handle.shutdown_async()


async def _wait_for_in_flight(
    handle: Any, replicas: int, grace_s: float, progress: Any, poll_s: float
) -> int:
    """Ask every ingress replica to drain, then poll their requests in flight until none is
    left or ``grace_s`` has passed; how many were left."""
    deadline = time.monotonic() + grace_s
    seen: dict[str, int] = {}
    tries = 0
    while len(seen) < replicas and tries < 8 * replicas and time.monotonic() < deadline:
        tries += 1
        try:
            answer = await asyncio.wait_for(
                handle.drain.remote(), timeout=max(0.5, deadline - time.monotonic())
            )
        except Exception:
            continue  # a replica going away; the deadline bounds this
        seen[answer["replica"]] = answer["in_flight"]
    progress(
        f"[taskray] draining: new requests get 503; {sum(seen.values())} in flight; waiting up "
        f"to {grace_s:.0f}s"
    )
    while sum(seen.values()) and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
        for _ in range(len(seen) if len(seen) == replicas else 2 * replicas):
            try:
                answer = await asyncio.wait_for(handle.in_flight.remote(), timeout=5)
            except Exception:
                continue
            seen[answer["replica"]] = answer["in_flight"]
    return sum(seen.values())
