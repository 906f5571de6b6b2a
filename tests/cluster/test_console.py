"""The driver's console: it follows a run's ``console.jsonl`` and ``metrics.jsonl`` (written
by rank 0 while the driver waits in ``trainer.fit``), shows each message once and moves a
progress bar over the planned steps; ``--verbose`` turns it off."""

from __future__ import annotations

import json
import time
from pathlib import Path

from actors.observe import console_event, say
from cluster import console
from cluster.console import TrainingConsole


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def test_messages_once_and_the_bar_follows_the_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TASKRAY_VERBOSE", raising=False)
    monkeypatch.delenv("TASKRAY_LOG_LEVEL", raising=False)
    monkeypatch.setattr(console, "POLL_S", 0.05)
    metrics = tmp_path / "metrics.jsonl"
    with TrainingConsole(tmp_path) as follower:
        say(tmp_path, "[taskray] model tiny (2 workers)")
        console_event(tmp_path, "plan", total_steps=8, steps_per_epoch=4, epochs=2, start_step=0)
        for step in range(1, 8):  # the last step is not logged (log_every)
            _append(metrics, {"epoch": 1, "step": step, "loss": 1.0 / step, "lr": 1e-3,
                              "tokens_per_s": 100.0})  # fmt: skip
        say(tmp_path, "[taskray] epoch 1 evaluation: accuracy 0.9000")
        with (tmp_path / "metrics.jsonl").open("a") as f:
            f.write('{"step": 8, "loss"')  # a line still being written is not read yet
        deadline = time.monotonic() + 10
        while (follower.bar is None or follower.bar.n < 7) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert follower.bar is not None and follower.bar.n == 7
        assert follower.bar.total == 8
    assert follower.bar.n == 8  # a run that ended without error is complete
    err = capsys.readouterr().err
    assert err.count("[taskray] model tiny (2 workers)") == 1
    assert err.count("[taskray] epoch 1 evaluation: accuracy 0.9000") == 1
    assert "8/8" in err and "loss=0.1429" in err


def test_a_resumed_run_starts_the_bar_at_its_step(tmp_path, monkeypatch):
    monkeypatch.delenv("TASKRAY_VERBOSE", raising=False)
    monkeypatch.setattr(console, "POLL_S", 0.05)
    with TrainingConsole(tmp_path) as follower:
        console_event(tmp_path, "plan", total_steps=24, steps_per_epoch=12, epochs=2, start_step=9)
        deadline = time.monotonic() + 10
        while follower.bar is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert follower.bar.n == 9 and follower.bar.total == 24


def test_verbose_leaves_the_console_to_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKRAY_VERBOSE", "1")
    with TrainingConsole(tmp_path) as follower:
        say(tmp_path, "[taskray] model tiny")
    assert not follower.enabled and follower.bar is None
    monkeypatch.delenv("TASKRAY_VERBOSE")
    monkeypatch.setenv("TASKRAY_LOG_LEVEL", "info")
    assert console.verbose()
