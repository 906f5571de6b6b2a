"""`taskray submit` and `taskray jobs`: run taskray commands as Ray jobs on a cluster.

Everything goes through Ray's own job API (``ray.job_submission.JobSubmissionClient``): the
checkout is uploaded as the job's ``working_dir`` runtime env (large and ignored paths left
out), the command runs there as ``python -m cluster.cli ...``, and Ray schedules it. Nothing
here schedules anything itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from cluster.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Commands that may be submitted (each is ``taskray COMMAND`` run on the cluster).
SUBMITTABLE = ("train", "index", "evaluate", "info")

#: Left out of the uploaded working dir (gitignore syntax, relative to it). Ray also honours
#: the checkout's ``.gitignore``; these hold even when it does not (or is missing) because
#: Ray refuses packages over its GCS size limit and weights or runs have no place in one.
DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "runs/",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build/",
    "dist/",
    "benchmarks/results/",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    # Secrets for the Kubernetes manifests are never shipped with a job.
    "k8s/*.env",
    ".env",
)

#: Job states after which nothing changes any more.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

DEFAULT_JOB_SERVER = "http://127.0.0.1:8265"
URI_SCHEMES_LOCAL = ("", "file")


class JobsError(UserError):
    """A job-submission problem the user can fix (printed as one ``taskray: error:`` line)."""


# ----- addresses and authentication ---------------------------------------------------------
def job_server_address(explicit: str | None = None) -> str:
    """The job server (dashboard) URL: ``--address``, else the env vars Ray reads, else local.

    Ray's client lets ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` override an explicit address;
    here an explicit ``--address`` wins, and a bare ``host:port`` is taken as HTTP.
    """
    address = (
        explicit
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_JOB_SERVER
    )
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    scheme = urlparse(address).scheme
    if scheme not in ("http", "https"):
        raise JobsError(
            f"job server address {address!r} is not an http(s) URL; pass the head node's "
            "dashboard address, e.g. --address http://HEAD:8265"
        )
    return address


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for a cluster with Ray token authentication.

    Token sources in Ray's own order: ``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``. Ray's client only sends a token when
    ``RAY_AUTH_MODE=token`` is set in this process, so taskray passes it explicitly; with
    ``RAY_AUTH_MODE=disabled`` nothing is sent.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise JobsError(f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist")
        token = path.read_text().strip()
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        if default.is_file():
            token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


class _AddressEnvHidden:
    """Hide Ray's address variables while the client is built, so ``url`` is what it uses."""

    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")

    def __enter__(self) -> None:
        self.saved = {n: os.environ.pop(n) for n in self.names if n in os.environ}

    def __exit__(self, *exc: object) -> None:
        os.environ.update(self.saved)


def connect_jobs(address: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for the cluster, with one-line errors when it cannot be used."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = job_server_address(address)
    try:
        with _AddressEnvHidden():
            client = JobSubmissionClient(url, headers=auth_headers())
    except ConnectionError:
        raise JobsError(
            f"cannot reach the Ray job server at {url}: start the cluster (or port-forward its "
            "dashboard port 8265) and pass --address http://HEAD:8265"
        ) from None
    except AuthenticationError:
        raise JobsError(_auth_message(url)) from None
    except RuntimeError as err:
        raise JobsError(
            f"the Ray job server at {url} refused the connection: {_first(err)}"
        ) from None
    client.taskray_url = url
    return client


def _auth_message(url: str) -> str:
    return (
        f"the Ray cluster at {url} requires its token (Ray token authentication): put it in "
        "~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH "
        "(`ray get-auth-token` on the head prints it)"
    )


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _call(client: Any, job_id: str | None, fn: str, *args: Any) -> Any:
    """Call a client method, turning "no such job" and auth failures into one-line errors."""
    from ray.exceptions import AuthenticationError

    url = getattr(client, "taskray_url", "the cluster")
    try:
        return getattr(client, fn)(*args)
    except AuthenticationError:
        raise JobsError(_auth_message(url)) from None
    except RuntimeError as err:
        text = str(err)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise JobsError(
                f"no job {job_id!r} on {url}; `taskray jobs list --address {url}` lists them"
            ) from None
        raise JobsError(f"{fn} failed on {url}: {_first(err)}") from None


# ----- runtime env --------------------------------------------------------------------------
def parse_env_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings into a dict (``--env``)."""
    out: dict[str, str] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JobsError(f"--env {item!r} is not of the form KEY=VALUE")
        out[key.strip()] = value
    return out


def read_runtime_env_file(path: str | None) -> dict[str, Any]:
    """A runtime env YAML/JSON file (Ray's own format), or ``{}``."""
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise JobsError(f"runtime env file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise JobsError(f"invalid YAML in runtime env file {p}: {_first(err)}") from None
    if not isinstance(data, dict):
        raise JobsError(f"runtime env file {p} must hold a mapping (working_dir, pip, env_vars…)")
    return data


def build_runtime_env(
    working_dir: str | os.PathLike[str] | None,
    *,
    pip: Sequence[str] = (),
    env_vars: dict[str, str] | None = None,
    excludes: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job's runtime env: ``base`` (a user file) + the checkout as working dir + flags.

    The checkout is uploaded without :data:`DEFAULT_EXCLUDES` (and ``excludes``); a
    ``working_dir`` already in ``base`` (e.g. a zip URI) is kept. ``pip`` and ``env_vars`` add
    to what ``base`` has, flags winning. The result is validated by Ray's ``RuntimeEnv``.
    """
    from ray.runtime_env import RuntimeEnv

    env: dict[str, Any] = dict(base or {})
    if "working_dir" not in env and working_dir is not None:
        wd = Path(working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise JobsError(f"working directory not found: {wd}")
        env["working_dir"] = str(wd)
    env["excludes"] = _unique([*DEFAULT_EXCLUDES, *(env.get("excludes") or []), *excludes])
    if pip:
        existing = env.get("pip") or []
        if isinstance(existing, dict):
            existing = {**existing, "packages": [*existing.get("packages", []), *pip]}
            env["pip"] = existing
        else:
            env["pip"] = [*existing, *pip]
    # Unbuffered output so `--follow` shows progress as it happens, not in 8 KiB bursts.
    env["env_vars"] = {"PYTHONUNBUFFERED": "1", **(env.get("env_vars") or {}), **(env_vars or {})}
    try:
        RuntimeEnv(**env)
    except (ValueError, TypeError) as err:
        raise JobsError(f"invalid runtime env: {_first(err)}") from None
    return env


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


# ----- storage ------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    """``s3://…``, ``gs://…`` and the like (not ``file://`` and not plain paths)."""
    scheme = urlparse(path).scheme
    return "://" in path and scheme not in URI_SCHEMES_LOCAL


def storage_problem(
    path: str, what: str, *, multi_node: bool, storage_path: str | None = None
) -> str | None:
    """Why ``path`` is not storage a cluster job can rely on, or ``None`` when it is.

    Shared storage is a path under ``storage_path`` (a mount every node sees) or, where a
    command accepts one, a URI (``s3://``, ``gs://``…; ``taskray train`` refuses URIs for its
    ``output_dir``). A relative path is always a problem for a submitted job: it resolves
    inside the job's unpacked copy of the working dir, which Ray deletes. An absolute path
    outside ``storage_path`` is a problem only on a cluster of several nodes, where each node
    writes its own disk.
    """
    if is_uri(path):
        return None
    p = PurePosixPath(path)
    fix = (
        "use shared storage every node mounts, e.g. "
        f"--output {storage_path or '/mnt/shared'}/runs/NAME"
        + ("" if storage_path else " (and say so with --storage-path /mnt/shared)")
    )
    if not p.is_absolute():
        return (
            f"{what} {path!r} is relative, so on the cluster it lands inside the job's "
            f"temporary copy of the working dir (deleted by Ray); {fix}"
        )
    if storage_path and not is_uri(storage_path):
        root = PurePosixPath(storage_path)
        if p == root or root in p.parents:
            return None
    if multi_node:
        return (
            f"{what} {path!r} is a local path on a multi-node cluster: checkpoints and the "
            f"bundle would be scattered over the nodes' own disks; {fix}"
        )
    return None


def is_loopback(url: str) -> bool:
    """Whether the job server is on this machine."""
    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def alive_nodes(client: Any) -> int | None:
    """The number of alive nodes (Ray's state API, same server and headers), or ``None``."""
    try:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        state = StateApiClient(address=client.taskray_url, headers=auth_headers())
        nodes = state.list(
            StateResource.NODES,
            options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
            raise_on_missing_output=False,
        )
        return len(nodes)
    except Exception:  # the warning is advisory: never fail a submission over it
        return None


def cluster_is_multi_node(client: Any) -> bool:
    """Several nodes now, or a remote cluster (which may add nodes by autoscaling)."""
    nodes = alive_nodes(client)
    if nodes is not None and nodes > 1:
        return True
    return not is_loopback(client.taskray_url)


# ----- submit -------------------------------------------------------------------------------
def _submit_options(p: argparse.ArgumentParser) -> None:
    """The options of ``taskray submit`` (they may come before or after COMMAND's own)."""
    p.add_argument("--address", help="job server URL, e.g. http://HEAD:8265 (or RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    p.add_argument(
        "--working-dir", help="directory uploaded as the job's working dir (default: checkout)"
    )
    p.add_argument(
        "--runtime-env", help="Ray runtime env YAML to start from (pip, env_vars, working_dir…)"
    )
    p.add_argument("--pip", action="append", help="pip requirement to add (repeatable)")
    p.add_argument("--env", action="append", help="KEY=VALUE env var for the job (repeatable)")
    p.add_argument("--exclude", action="append", help="extra path pattern not to upload")
    p.add_argument(
        "--storage-path",
        help="shared storage every node mounts (or a URI); output paths under it are trusted "
        "(default: TASKRAY_STORAGE_PATH)",
    )
    p.add_argument("--job-id", help="submission id (default: chosen by Ray)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, stop")


def _split_submit_args(args: argparse.Namespace) -> list[str]:
    """Pull submit's own options out of the forwarded arguments; return the rest in order."""
    inner = argparse.ArgumentParser(
        add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS
    )
    _submit_options(inner)
    found, rest = inner.parse_known_args(args.command_args)
    for key, value in vars(found).items():
        before = getattr(args, key, None)
        setattr(args, key, [*before, *value] if isinstance(before, list) else value)
    return rest


def _local_command_args(
    parser: argparse.ArgumentParser, command: str, rest: list[str]
) -> argparse.Namespace:
    """Parse COMMAND's arguments with this checkout's parser (the ``taskray`` parser that
    ``register`` was given), so mistakes fail before upload."""
    known = {
        name
        for action in parser._subparsers._group_actions  # argparse keeps subparsers here
        for name in getattr(action, "choices", None) or {}
    }
    if command not in known:
        raise JobsError(f"this checkout has no `taskray {command}` command to submit")
    return parser.parse_args([command, *rest])


def _inside(path: Path, root: Path) -> str:
    """``path`` relative to the uploaded ``root`` (POSIX), or a one-line error."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise JobsError(
            f"{path} is outside the uploaded working dir {root}; move it into the checkout "
            "or pass --working-dir"
        ) from None


def _train_output_dir(ns: argparse.Namespace) -> str:
    """The run directory the submitted `taskray train` will use (the config is validated)."""
    from cluster.config import TrainConfig, apply_overrides, read_yaml, validate_config

    flags = {
        "data.train": ns.train,
        "data.validation": ns.validation,
        "model.name_or_path": ns.model,
        "output_dir": ns.output,
        "scaling.workers": ns.workers,
        "training.epochs": ns.epochs,
    }
    overrides = list(ns.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    data = apply_overrides(read_yaml(ns.config), overrides)
    return validate_config(TrainConfig, data, source=ns.config).output_dir


def storage_paths(command: str, ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(what, path) pairs the submitted command writes or reads that must outlive the job."""
    if command == "train":
        return [("output_dir", _train_output_dir(ns))]
    if command == "evaluate":
        return [("bundle", ns.bundle)]
    return []


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit ``taskray COMMAND ...`` as a Ray job with the checkout as its working dir."""
    rest = _split_submit_args(args)
    command = args.command_name
    ns = _local_command_args(args.cli_parser, command, rest)
    working_dir = Path(args.working_dir or PROJECT_ROOT).expanduser().resolve()
    if command in ("train", "index") and getattr(ns, "config", None):
        config = Path(ns.config)
        if not config.is_file():
            raise JobsError(f"config file not found: {config}")
        # The job runs in the uploaded copy, so the config is named relative to it.
        rest = [_inside(config, working_dir) if a == ns.config else a for a in rest]
    runtime_env = build_runtime_env(
        working_dir,
        pip=args.pip or (),
        env_vars=parse_env_pairs(args.env or ()),
        excludes=args.exclude or (),
        base=read_runtime_env_file(args.runtime_env),
    )
    entrypoint = shlex.join(["python", "-m", "cluster.cli", command, *rest])
    storage = args.storage_path or os.environ.get("TASKRAY_STORAGE_PATH")
    paths = storage_paths(command, ns)
    if args.dry_run:
        print(json.dumps({"entrypoint": entrypoint, "runtime_env": runtime_env}, indent=2))
        return 0

    client = connect_jobs(args.address)
    multi_node = cluster_is_multi_node(client) if paths else False
    for what, path in paths:
        problem = storage_problem(path, what, multi_node=multi_node, storage_path=storage)
        if problem:
            print(f"taskray: warning: {problem}", file=sys.stderr)
    kwargs: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtime_env": runtime_env,
        "metadata": {"taskray_command": command},
        "submission_id": args.job_id,
        "entrypoint_num_cpus": args.entrypoint_num_cpus,
        "entrypoint_num_gpus": args.entrypoint_num_gpus,
    }
    job_id = _submit(client, kwargs)
    url = client.taskray_url
    print(f"[taskray] submitted job {job_id} to {url}", flush=True)
    if not args.follow:
        print(f"[taskray] logs: taskray jobs logs {job_id} --follow --address {url}")
        print(f"[taskray] stop: taskray jobs stop {job_id} --address {url}")
        return 0
    return follow(client, job_id)


def _submit(client: Any, kwargs: dict[str, Any]) -> str:
    from ray.exceptions import AuthenticationError

    url = client.taskray_url
    try:
        return client.submit_job(**kwargs)
    except AuthenticationError:
        raise JobsError(_auth_message(url)) from None
    except (RuntimeError, ValueError) as err:
        raise JobsError(f"the job server at {url} rejected the job: {_first(err)}") from None


def follow(client: Any, job_id: str, out: Any = None, timeout_s: float = 60.0) -> int:
    """Stream a job's logs until it ends; 0 when it SUCCEEDED, 1 otherwise.

    Ctrl-C stops following, not the job.
    """
    import aiohttp

    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        _call(client, job_id, "get_job_status", job_id)  # fail fast on an unknown id
        try:
            asyncio.run(tail())
        except (RuntimeError, OSError, aiohttp.ClientError) as err:
            raise JobsError(
                f"lost the log stream of job {job_id} ({_first(err)}); the job keeps running: "
                f"`taskray jobs logs {job_id} --follow` resumes"
            ) from None
        # The log stream closes when the job ends; its final status may lag by a moment.
        status = wait_terminal(client, job_id, timeout_s)
    except KeyboardInterrupt:
        print(
            f"\n[taskray] stopped following; the job keeps running "
            f"(`taskray jobs stop {job_id}` stops it)",
            file=sys.stderr,
        )
        return 130
    info = _call(client, job_id, "get_job_info", job_id)
    print(f"[taskray] job {job_id} {status}", flush=True)
    if status == "SUCCEEDED":
        return 0
    message = _first(info.message) if info.message else "see the logs above"
    print(f"taskray: error: job {job_id} {status}: {message}", file=sys.stderr)
    return 1


def wait_terminal(client: Any, job_id: str, timeout_s: float = 60.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout_s`` passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(_call(client, job_id, "get_job_status", job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


# ----- jobs ---------------------------------------------------------------------------------
def cmd_jobs(args: argparse.Namespace) -> int:
    """``taskray jobs list|status|logs|stop``."""
    client = connect_jobs(args.address)
    action = args.jobs_action
    if action == "list":
        jobs = _call(client, None, "list_jobs")
        jobs = sorted(jobs, key=lambda j: j.start_time or 0)
        if args.json:
            print(json.dumps([_job_dict(j) for j in jobs], indent=2))
            return 0
        if not jobs:
            print("no jobs")
            return 0
        print(f"{'JOB':<30} {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT")
        for j in jobs:
            started = _when(j.start_time)
            entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
            print(f"{j.submission_id or j.job_id:<30} {j.status.value:<10} {started:<19}  {entry}")
        return 0
    job_id = args.job_id
    if action == "status":
        info = _call(client, job_id, "get_job_info", job_id)
        if args.json:
            print(json.dumps(_job_dict(info), indent=2))
        else:
            message = f" ({_first(info.message)})" if info.message else ""
            print(f"{job_id} {info.status.value}{message}")
        return 0
    if action == "logs":
        if args.follow:
            return follow(client, job_id)
        sys.stdout.write(_call(client, job_id, "get_job_logs", job_id))
        return 0
    if action == "stop":
        stopped = _call(client, job_id, "stop_job", job_id)
        status = wait_terminal(client, job_id, args.timeout) if stopped else None
        if stopped:
            print(f"[taskray] job {job_id} {status}")
        else:
            current = _call(client, job_id, "get_job_status", job_id).value
            print(f"[taskray] job {job_id} was not running ({current})")
        return 0
    raise JobsError(f"unknown jobs action {action!r}")


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _job_dict(job: Any) -> dict[str, Any]:
    return {
        "submission_id": job.submission_id,
        "status": job.status.value,
        "entrypoint": job.entrypoint,
        "message": job.message,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "metadata": job.metadata,
    }


# ----- argparse -----------------------------------------------------------------------------
def register(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add the ``submit`` and ``jobs`` commands to the CLI's subparsers; ``parser`` (the whole
    ``taskray`` parser, complete by the time a command runs) checks a submitted command's
    arguments before anything is uploaded."""
    p = sub.add_parser(
        "submit",
        help="run a taskray command as a Ray job on a cluster",
        description="Submit `taskray COMMAND ARGS...` to a Ray cluster's job server with the "
        "checkout as the job's working dir (runs/, .git, .venv, weights and other large or "
        "ignored paths are not uploaded). Prints the job id; --follow streams the logs until "
        "the job ends. Options below may come before or after COMMAND's own arguments. "
        "Example: taskray submit train configs/classification-minilm.yaml "
        "--output /mnt/shared/runs/minilm --address http://HEAD:8265 --follow",
    )
    p.add_argument(
        "command_name", metavar="COMMAND", choices=SUBMITTABLE, help="/".join(SUBMITTABLE)
    )
    p.add_argument(
        "command_args",
        nargs=argparse.REMAINDER,
        metavar="ARGS",
        help="COMMAND's arguments, as for `taskray COMMAND` (paths relative to the checkout)",
    )
    _submit_options(p)
    p.set_defaults(func=cmd_submit, cli_parser=parser)

    p = sub.add_parser(
        "jobs",
        help="list Ray jobs, or show the status or logs of one, or stop it",
        description="Talk to a Ray cluster's job server (--address http://HEAD:8265 or "
        "RAY_ADDRESS; the token of Ray token authentication from ~/.ray/auth_token, "
        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH).",
    )
    actions = p.add_subparsers(dest="jobs_action", metavar="ACTION")
    actions.required = True

    def action(name: str, help_text: str, with_id: bool = True) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help_text, description=help_text)
        if with_id:
            a.add_argument("job_id", metavar="ID", help="job (submission) id")
        a.add_argument("--address", help="job server URL, e.g. http://HEAD:8265 (or RAY_ADDRESS)")
        a.set_defaults(func=cmd_jobs)
        return a

    a = action("list", "every job on the cluster with its status", with_id=False)
    a.add_argument("--json", action="store_true", help="print JSON")
    a = action("status", "a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = action("logs", "a job's logs so far, or --follow them until it ends")
    a.add_argument("--follow", action="store_true", help="stream until the job ends")
    a = action("stop", "stop a running job")
    a.add_argument("--timeout", type=float, default=30, help="seconds to wait for it to stop")
