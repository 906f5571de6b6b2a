"""`taskray submit` / `taskray jobs` and the cluster-launcher YAMLs."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster import jobs
from cluster.cli import main
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = sorted((ROOT / "cluster" / "launcher").glob("*.yaml"))


@pytest.fixture
def no_ray_env(monkeypatch):
    """No address or token from the environment leaks into a test."""
    for name in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
        "TASKRAY_STORAGE_PATH",
    ):
        monkeypatch.delenv(name, raising=False)


# ----- runtime env --------------------------------------------------------------------------
def test_runtime_env_uploads_the_checkout_without_large_or_ignored_paths():
    env = jobs.build_runtime_env(ROOT, pip=["tqdm"], env_vars={"HF_HUB_OFFLINE": "1"})
    assert env["working_dir"] == str(ROOT)
    for pattern in (".git", ".venv", "runs/", "*.safetensors", "k8s/*.env"):
        assert pattern in env["excludes"]
    assert env["pip"] == ["tqdm"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def test_runtime_env_merges_a_base_file_flags_winning():
    base = {
        "working_dir": "s3://bucket/taskray.zip",
        "excludes": ["notes/"],
        "pip": ["requests"],
        "env_vars": {"A": "base", "B": "base"},
    }
    env = jobs.build_runtime_env(
        ROOT, pip=["tqdm"], env_vars={"B": "flag"}, excludes=["scratch/"], base=base
    )
    assert env["working_dir"] == "s3://bucket/taskray.zip"  # kept: the user chose it
    assert env["excludes"][: len(jobs.DEFAULT_EXCLUDES)] == list(jobs.DEFAULT_EXCLUDES)
    assert {"notes/", "scratch/"} <= set(env["excludes"])
    assert env["pip"] == ["requests", "tqdm"]
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "A": "base", "B": "flag"}


def test_runtime_env_errors_are_one_line(tmp_path):
    with pytest.raises(jobs.JobsError, match="working directory not found"):
        jobs.build_runtime_env(tmp_path / "missing")
    with pytest.raises(jobs.JobsError, match="KEY=VALUE"):
        jobs.parse_env_pairs(["NOVALUE"])
    bad = tmp_path / "env.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(jobs.JobsError, match="must hold a mapping"):
        jobs.read_runtime_env_file(str(bad))


# ----- storage ------------------------------------------------------------------------------
def test_storage_warning_rules():
    problem = jobs.storage_problem
    # A relative path lands in the job's temporary working dir, even on one node.
    assert "relative" in problem("runs/x", "output_dir", multi_node=False)
    # A local absolute path is fine on one node, a problem on several.
    assert problem("/data/runs/x", "output_dir", multi_node=False) is None
    warning = problem("/data/runs/x", "output_dir", multi_node=True)
    assert "multi-node" in warning and "--output" in warning
    # Shared storage: a URI, or a path under the declared shared mount.
    assert problem("s3://bucket/runs/x", "output_dir", multi_node=True) is None
    assert problem("gs://bucket/runs/x", "output_dir", multi_node=True) is None
    assert (
        problem("/mnt/fsx/runs/x", "output_dir", multi_node=True, storage_path="/mnt/fsx") is None
    )
    assert problem("/mnt/fsxy/x", "output_dir", multi_node=True, storage_path="/mnt/fsx")


def test_remote_clusters_count_as_multi_node():
    assert jobs.is_loopback("http://127.0.0.1:8265") and jobs.is_loopback("http://localhost:1")
    assert not jobs.is_loopback("http://10.0.0.5:8265")


def test_submit_prints_the_storage_warning(no_ray_env, monkeypatch, capsys):
    class FakeClient:
        taskray_url = "http://10.0.0.5:8265"

        def submit_job(self, **kwargs):
            self.kwargs = kwargs
            return "raysubmit_fake"

    client = FakeClient()
    monkeypatch.setattr(jobs, "connect_jobs", lambda address: client)
    monkeypatch.setattr(jobs, "alive_nodes", lambda c: 3)
    rc = main(["submit", "train", "configs/classification-minilm.yaml", "--output", "/data/runs/x"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "raysubmit_fake" in captured.out
    (warning,) = [line for line in captured.err.splitlines() if "warning" in line]
    assert warning.startswith("taskray: warning: output_dir '/data/runs/x' is a local path")
    assert client.kwargs["entrypoint"] == (
        "python -m cluster.cli train configs/classification-minilm.yaml --output /data/runs/x"
    )
    # Declared shared storage: no warning.
    rc = main(
        [
            "submit",
            "train",
            "configs/classification-minilm.yaml",
            "--output",
            "/mnt/shared/runs/x",
            "--storage-path",
            "/mnt/shared",
        ]
    )
    assert rc == 0 and "warning" not in capsys.readouterr().err


# ----- addresses and tokens -----------------------------------------------------------------
def test_job_server_address(no_ray_env, monkeypatch):
    assert jobs.job_server_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    assert jobs.job_server_address() == "http://env-head:8265"
    assert jobs.job_server_address("head:8265/") == "http://head:8265"  # explicit wins
    with pytest.raises(jobs.JobsError, match="http"):
        jobs.job_server_address("ray://head:10001")


def test_auth_token_sources_in_rays_order(no_ray_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default\n")
    assert jobs.auth_headers() == {"Authorization": "Bearer from-default"}
    token_file = tmp_path / "token"
    token_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert jobs.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers() == {}


# ----- the command line ---------------------------------------------------------------------
def test_submit_dry_run_builds_the_job(no_ray_env, capsys):
    rc = main(
        [
            "submit",
            "--follow",
            "train",
            str(ROOT / "configs" / "classification-minilm.yaml"),
            "training.lr=3e-5",
            "--workers",
            "4",
            "--env",
            "A=1",
            "--pip",
            "tqdm",
            "--dry-run",
        ]
    )
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    # Submit's own options are taken out wherever they are; the config is named relative to
    # the uploaded checkout, where the job runs.
    assert plan["entrypoint"] == (
        "python -m cluster.cli train configs/classification-minilm.yaml training.lr=3e-5 "
        "--workers 4"
    )
    assert plan["runtime_env"]["working_dir"] == str(ROOT)
    assert plan["runtime_env"]["env_vars"]["A"] == "1"
    assert plan["runtime_env"]["pip"] == ["tqdm"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "train", "missing.yaml", "--dry-run"], "config file not found: missing.yaml"),
        (["submit", "train", "/etc/hostname", "--dry-run"], "outside the uploaded working dir"),
        (["submit", "train", "configs/serve.yaml", "--dry-run"], "configs/serve.yaml"),
        (["submit", "info", "--env", "oops", "--dry-run"], "KEY=VALUE"),
    ],
)
def test_user_errors_are_one_line(no_ray_env, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("taskray: error:") and message in err[0]


def test_unreachable_job_server_is_a_one_line_error(no_ray_env, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["jobs", "list", "--address", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "cannot reach the Ray job server at " + url in err[0]


@pytest.mark.parametrize("argv", [["submit"], ["jobs"], ["jobs", "logs"], ["k8s"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: taskray" in capsys.readouterr().out


# ----- cluster launcher ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def launcher_schema():
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_validates_against_rays_schema(path, launcher_schema):
    config = yaml.safe_load(path.read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in launcher_schema.iter_errors(config)
    ]
    assert errors == []


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_shape(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    rel = path.relative_to(ROOT).as_posix()
    for command in (f"ray up {rel}", f"ray down {rel}", "taskray submit", f"ray submit {rel}"):
        assert command in header, command
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    (gpu_type,) = [name for name in types if name != config["head_node_type"]]
    assert types[gpu_type]["min_workers"] == 0 < types[gpu_type]["max_workers"]
    assert "gpu" in config["docker"]["image"]
    ray_pin = re.search(r'"ray\[[^\]]*\]>=([\d.]+),', (ROOT / "pyproject.toml").read_text())
    for image in (config["docker"]["image"], config["docker"]["head_image"]):
        assert image.startswith(f"rayproject/ray:{ray_pin.group(1)}.")
    assert any("pip install" in c and "~/taskray" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/taskray"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in commands)


# ----- live: a real head with the job server ------------------------------------------------
@pytest.fixture
def ray_head(no_ray_env, monkeypatch):
    """A Ray head with dashboard + job server and token auth on (its own token), stopped after.

    ``ray start --block`` keeps the head's processes children of the one we start, so stopping
    that one process (and the group it leads) ends exactly this head and nothing else.
    """
    token = secrets.token_hex(16)
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="trj", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_bin,
        "start",
        "--head",
        "--block",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        f"--port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dashboard}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(Path(temp_dir) / 'ray-start.log').read_text()}")
            try:
                jobs.connect_jobs(url)
                break
            except jobs.JobsError:
                if time.monotonic() > deadline:
                    pytest.fail("the Ray job server did not come up within 60 s")
                time.sleep(0.5)
        yield url, token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_submit_follow_status_logs_on_a_real_head(ray_head, capsys):
    import requests

    url, _ = ray_head
    # Token authentication is on: without the token the job server refuses.
    assert requests.get(f"{url}/api/jobs/", timeout=10).status_code == 401

    job_id = f"taskray-test-{secrets.token_hex(4)}"
    rc = main(["submit", "info", "--json", "--address", url, "--follow", "--job-id", job_id])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"submitted job {job_id}" in out and f"job {job_id} SUCCEEDED" in out
    # The job ran `taskray info --json` from the uploaded checkout, inside the cluster.
    assert '"versions"' in out and '"ray_address"' in out

    assert main(["jobs", "status", job_id, "--address", url]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id} SUCCEEDED")
    assert main(["jobs", "logs", job_id, "--address", url]) == 0
    assert '"attention"' in capsys.readouterr().out
    assert main(["jobs", "list", "--json", "--address", url]) == 0
    listed = json.loads(capsys.readouterr().out)
    (job,) = [j for j in listed if j["submission_id"] == job_id]
    assert job["entrypoint"] == "python -m cluster.cli info --json"
    assert job["metadata"]["taskray_command"] == "info"

    # The node count behind the storage warning comes from Ray's state API on the same server.
    assert jobs.alive_nodes(jobs.connect_jobs(url)) == 1

    assert main(["jobs", "status", "no-such-job", "--address", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no job 'no-such-job'" in err[0]
