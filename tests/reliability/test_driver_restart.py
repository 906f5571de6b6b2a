"""The driver of a run killed mid-epoch (SIGKILL, as a lost head-node process would be) and the
same command run again: it resumes from the last registered checkpoint rather than starting
over, and finishes the planned steps exactly once more."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import read_jsonl, tiny_bert_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _latest_step_checkpoint(run_dir: Path) -> int | None:
    snapshot = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if latest and latest["checkpoint_dir_name"].startswith("step-"):
        return int(latest["metrics"]["step"])
    return None


def _train_workers_alive() -> bool:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(proc.info.get("cmdline") or []):
            return True
    return False


def test_killed_driver_rerun_resumes(ray_session, tmp_path, tiny_bert):
    run_dir = tmp_path / "run"
    config = tiny_bert_train_config(
        tmp_path,
        tiny_bert,
        train_rows=96,
        val_rows=32,
        training={
            "epochs": 2,
            "batch_size": 8,
            "grad_accum": 2,
            "lr": 5e-3,
            "log_every": 1,
            "checkpoint_every": 2,
        },
        scaling={"workers": 1, "keep_checkpoints": 2},
        ray={"address": ray_session.get_runtime_context().gcs_address},
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "cluster.cli", "train", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        killed_after = _wait_for(
            lambda: _latest_step_checkpoint(run_dir), 240, "a mid-epoch checkpoint"
        )
        os.killpg(first.pid, signal.SIGKILL)  # the driver and anything it started
    finally:
        first.wait(timeout=30)
    # The Train controller and workers are the driver's: they go with it.
    _wait_for(lambda: not _train_workers_alive(), 60, "the dead driver's workers to exit")
    done_before = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumes = read_jsonl(run_dir / "resumes.jsonl")
    assert len(resumes) == 1, resumes
    assert resumes[0]["step"] >= killed_after and resumes[0]["step"] % 2 == 0
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    after = steps[len(done_before) :]
    # Not started over: the rerun's first step follows the checkpoint, and the run ends at the
    # planned 12 steps (6 per epoch: 96 rows, 1 worker, batch 8, 2 accumulated). One worker:
    # what is under test is the driver, not the worker group.
    assert after and after[0] == resumes[0]["step"] + 1, (done_before, after)
    assert max(steps) == 12
    assert Path(run_dir, "bundle", "taskray.json").is_file()
