"""`taskray serve`: deploy a Serve config file, wait until it is ready, run or detach."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from cluster.config import ConfigError, read_yaml

APP_NAME = "taskray"


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


def deploy(config: Any) -> None:
    """Start Serve with the file's HTTP options and submit the applications (as `serve run`)."""
    from ray.serve._private import api as serve_api

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config, _blocking=False)


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
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"application '{name}' {app.status}: {app.message}")
            shown = str(getattr(app.status, "value", app.status))
            if shown != last:
                last = shown
                progress(f"[taskray] application '{name}': {shown}")
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f}s")


def ensure_cluster(num_cpus: int | None) -> None:
    """Connect to a running local Ray cluster, starting a head node when none runs."""
    import ray

    try:
        ray.init(address="auto", namespace="serve", log_to_driver=False)
        return
    except (ConnectionError, RuntimeError):
        pass
    cmd = ["ray", "start", "--head", "--disable-usage-stats", "--include-dashboard=false"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_head_env())
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["unknown error"]
        raise RuntimeError(f"could not start a local Ray head: {tail[0]}")
    ray.init(address="auto", namespace="serve", log_to_driver=False)


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


def stop_detached() -> bool:
    """Remove the taskray application from the running cluster; False when none runs."""
    import ray
    from ray import serve

    try:
        ray.init(address="auto", namespace="serve", log_to_driver=False)
    except (ConnectionError, RuntimeError):
        return False
    serve.shutdown()
    return True
