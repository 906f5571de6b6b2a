"""Stopping servers the way operators do: real signals sent to a real `taskray serve` process.

SIGTERM during a streamed request drains (the stream ends normally, new requests get 503),
the command exits 0 and leaves none of the Ray processes it started; a new server starts on
the same port right after, and Ctrl-C (SIGINT) past its grace period cuts a stream and still
exits 0; `--stop` against a cluster address that does not answer gives up within its bound
with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.conftest import free_port, tiny_bert_train_config, tiny_lm_dir

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LONG = 1500  # tokens: a stream that lasts seconds on the tiny llama


def _config(tmp: Path, port: int) -> Path:
    bundle = tiny_lm_dir(tmp / "lm")
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "taskray",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {
                    "limits": {"max_input_tokens": 64, "max_new_tokens": LONG},
                    "models": [{"name": "lm", "bundle": str(bundle), "num_cpus": 0.5}],
                },
                "deployments": [{"name": "generator-lm", "max_ongoing_requests": 8}],
            }
        ],
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Server:
    """A foreground `taskray serve` child with its own local Ray instance and log file."""

    def __init__(self, config: Path, port: int, log: Path, ray_tmp: str, grace_s: float) -> None:
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", "serve", str(config), "--num-cpus", "2",
             "--grace-period", str(grace_s)],
            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            # as at a terminal: a child of a shell's background job starts with SIGINT ignored
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, line: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while line not in self.text():
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, f"no {line!r} in time:\n{self.text()[-3000:]}"
            time.sleep(0.25)

    def ray_processes(self) -> list[psutil.Process]:
        """Everything this server started (Ray's GCS, raylet, workers, replicas)."""
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


def _stream(url: str, out: dict[str, Any]) -> None:
    """One streamed completion of LONG tokens; records the events it read and how it ended."""
    body = {"model": "lm", "prompt": "Once", "max_tokens": LONG, "stream": True}
    out["events"] = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            out["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    out["events"].append(line[6:])
    except httpx.HTTPError as err:
        out["error"] = repr(err)


def _streaming(url: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A reader thread running :func:`_stream`, returned once its first event has arrived."""
    out: dict[str, Any] = {}
    reader = threading.Thread(target=_stream, args=(url, out), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not out.get("events"):
        assert reader.is_alive() and time.monotonic() < deadline, out
        time.sleep(0.05)
    return reader, out


def _left_after(started: list[psutil.Process], timeout_s: float = 30) -> list[str]:
    """The processes of ``started`` still alive once ``timeout_s`` has passed (or none are)."""
    deadline = time.monotonic() + timeout_s
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.25)
    return _alive(started)


@pytest.fixture()
def ray_tmp():
    # Short: Ray's Unix socket paths under it must stay below 108 characters.
    path = tempfile.mkdtemp(prefix="trl-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sigterm_drains_a_stream_exits_0_and_a_new_server_starts_at_once(tmp_path, ray_tmp):
    port = free_port()
    config = _config(tmp_path, port)
    first = Server(config, port, tmp_path / "first.log", ray_tmp, grace_s=60)
    try:
        first.wait_for("to stop", 240)
        started = first.ray_processes()
        assert started, "the server started no Ray processes"
        reader, out = _streaming(first.url)
        t_signal = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        # While the stream is still going, the server turns new requests away.
        refused = None
        while reader.is_alive() and time.monotonic() < t_signal + 60:
            try:
                refused = httpx.post(
                    f"{first.url}/v1/completions",
                    json={"model": "lm", "prompt": "Hi", "max_tokens": 2},
                    timeout=10,
                )
            except httpx.HTTPError:
                break
            if refused.status_code == 503:
                break
            time.sleep(0.1)
        reader.join(timeout=90)
        assert first.proc.wait(timeout=120) == 0, first.text()[-3000:]
        stopped_after = time.monotonic() - t_signal
        # The stream in flight ran to its end: every token, then the normal finish.
        assert out.get("status") == 200 and "error" not in out, out
        assert out["events"][-1] == "[DONE]", out["events"][-3:]
        finish = json.loads(out["events"][-2])["choices"][0]["finish_reason"]
        assert finish == "length", out["events"][-2]
        assert refused is not None and refused.status_code == 503, refused
        assert refused.headers.get("retry-after") == "1"
        log = first.text()
        assert "SIGTERM: shutting down" in log and "in-flight requests finished" in log, log
        assert "SIGTERM received" not in log  # Ray's own abort handler never ran
        assert stopped_after < 60 + 60, stopped_after
        print(f"\nfirst server: SIGTERM -> exit 0 in {stopped_after:.1f}s, stream finished")
        assert _left_after(started) == [], "Ray processes left behind"
    finally:
        first.stop()

    # Start right after stop, on the same port: ready and answering. This one has a 1 s grace
    # period: Ctrl-C (SIGINT) during a long stream cuts it after that second and still exits 0.
    second = Server(config, port, tmp_path / "second.log", ray_tmp, grace_s=1)
    try:
        second.wait_for("to stop", 240)
        answer = httpx.post(
            f"{second.url}/v1/completions",
            json={"model": "lm", "prompt": "Hi", "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        started = second.ray_processes()
        reader, out = _streaming(second.url)
        t_signal = time.monotonic()
        second.proc.send_signal(signal.SIGINT)
        assert second.proc.wait(timeout=120) == 0, second.text()[-3000:]
        print(f"second server (1 s grace): SIGINT -> exit 0 in {time.monotonic() - t_signal:.1f}s")
        reader.join(timeout=30)
        assert "[taskray] SIGINT: shutting down" in second.text()
        assert "grace period over with 1 request(s) still in flight" in second.text()
        assert "error" in out or out["events"][-1] != "[DONE]", out  # cut, not finished
        assert _left_after(started) == []
    finally:
        second.stop()


def test_stop_against_an_address_that_never_answers_gives_up_in_time(tmp_path):
    """`--stop` pointed at a cluster that is gone: one line, non-zero, within the bound."""
    import socket

    # Something accepts TCP on the port but never speaks Ray's protocol (a hung head).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        env = {**os.environ, "TASKRAY_CONNECT_TIMEOUT_S": "5"}
        env.pop("RAY_ADDRESS", None)
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "serve", "--stop", "--address", address],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - t0
    assert done.returncode == 2, (done.stdout, done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("taskray: error:")]
    assert len(errors) == 1 and address in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert took < 5 + 25, took  # the bound plus interpreter start and import time


def test_sigterm_during_training_exits_143_and_leaves_no_ray_processes(tmp_path, ray_tmp,
                                                                       tiny_bert):  # fmt: skip
    """`taskray train` on its own local Ray, stopped by SIGTERM mid-run: one line, exit 143
    (128 + SIGTERM, as shells report it), and every process it started is gone."""
    run_dir = tmp_path / "run"
    config = tiny_bert_train_config(
        tmp_path,
        tiny_bert,
        train_rows=96,
        training={"epochs": 50, "batch_size": 8, "lr": 5e-3, "log_every": 1},
        scaling={"workers": 1},
        ray={"num_cpus": 2},
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "train.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "train", str(path)],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while (
            not (run_dir / "metrics.jsonl").is_file()
            or "loss" not in (run_dir / "metrics.jsonl").read_text()
        ):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step was logged"
            time.sleep(0.25)
        started = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        took = time.monotonic() - t0
        text = log.read_text(errors="replace")
        assert "taskray: terminated" in text
        assert "SIGTERM received" not in text and "Traceback" not in text, text[-3000:]
        assert _left_after(started) == [], "Ray processes left behind"
        assert took < 60, took
        print(f"\ntrain: SIGTERM -> exit 143 in {took:.1f}s, {len(started)} processes, 0 left")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
