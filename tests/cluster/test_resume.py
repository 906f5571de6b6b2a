"""Exact resume: a 2-worker run whose worker process is killed mid-epoch recovers through Ray
Train's FailureConfig from its last step checkpoint and ends with the same weights as a run
that was never interrupted; keep-last-K prunes the rest."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from cluster.config import TrainConfig
from cluster.train import run_training
from tests.conftest import read_jsonl, tiny_bert_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(tmp: Path, tiny_bert: Path, name: str) -> TrainConfig:
    # The tiny BERT has dropout, so an exact match also needs each rank's RNG restored.
    return TrainConfig.model_validate(
        tiny_bert_train_config(
            tmp,
            tiny_bert,
            train_rows=192,
            val_rows=32,
            training={
                "epochs": 2,
                "batch_size": 8,
                "grad_accum": 2,
                "lr": 5e-3,
                "log_every": 1,
                "seed": 1,
                "checkpoint_every": 2,
            },
            scaling={"workers": 2, "max_failures": 1, "keep_checkpoints": 2},
            output_dir=str(tmp / name),
        )
    )


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "RayTrainWorker" in cmdline:
            found.append(proc)
    return found


def _kill_a_worker_after_step_checkpoint(run_dir: Path, killed: list[int], deadline_s: float):
    """SIGKILL one Ray Train worker process, as a crashed node would, as soon as Ray has
    registered a mid-epoch (step) checkpoint. Polls Ray's checkpoint-manager snapshot with a
    deadline: Ray collects reports by polling the workers (every 2 s), so a crash right after
    a report can lose that checkpoint, and the run would restart from the one before."""
    snapshot = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError, TypeError):
            latest = None
        if latest and latest["checkpoint_dir_name"].startswith("step-"):
            workers = _train_workers()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(int(latest["metrics"]["step"]))
                return
        time.sleep(0.01)


def _weights(bundle: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(bundle) / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory, tiny_bert):
    cfg = _config(tmp_path_factory.mktemp("resume"), tiny_bert, "uninterrupted")
    return cfg, run_training(cfg, progress=lambda *_: None)


def test_killed_worker_resumes_to_identical_weights(reference, tmp_path_factory, tiny_bert):
    _, expected = reference
    cfg = _config(tmp_path_factory.mktemp("resume-killed"), tiny_bert, "killed")
    killed: list[int] = []
    # Checkpoints every 2 steps, 6 steps per epoch: the kill lands after a mid-epoch one, so
    # the run must restore the data position within the epoch, not just the epoch.
    killer = threading.Thread(
        target=_kill_a_worker_after_step_checkpoint,
        args=(Path(cfg.output_dir), killed, 240.0),
        daemon=True,
    )
    killer.start()
    outcome = run_training(cfg, progress=lambda *_: None)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was killed: no step checkpoint was registered in time"

    # The run itself records each resume; a logged step repeating is not a reliable sign,
    # because the kill can land before any step after the checkpoint was logged.
    resumes = read_jsonl(Path(cfg.output_dir, "resumes.jsonl"))
    assert resumes, "the run never resumed from a checkpoint"
    steps = [r["step"] for r in read_jsonl(Path(cfg.output_dir, "metrics.jsonl")) if "loss" in r]
    # The resume follows a mid-epoch checkpoint (the one registered before the kill, or a
    # later one): not a fresh start, not an epoch boundary.
    resumed_after = resumes[0]["step"]
    assert resumes[0]["from"].startswith("step-"), resumes
    assert resumed_after >= killed[0] and resumed_after % 2 == 0, resumes
    assert resumed_after % 6 != 0, resumes
    assert max(steps) == 12

    got, want = _weights(outcome.bundle), _weights(expected.bundle)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name  # bit-identical, not just close


def test_keep_last_k_checkpoints(reference):
    cfg, _ = reference
    kept = sorted(p.name for p in Path(cfg.output_dir, "ray", "train").iterdir() if p.is_dir())
    kept = [n for n in kept if n.startswith(("step-", "epoch-"))]
    # Reports: step-2, -4, epoch-1 (step 6), step-8, -10, epoch-2; keep the last 2.
    assert kept == ["epoch-0002", "step-0000010"]
