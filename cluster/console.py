"""What a person sees at the console: taskray's own lines once each and a progress bar with
rate and ETA, while Ray's logs go to files (``--verbose`` or ``TASKRAY_LOG_LEVEL=INFO`` brings
them back to the console).

Ray forwards every worker's output to the driver and deduplicates only some of it, so worker
lines arrive twice and Ray's own messages (placement-group cleaners, dataset plans) crowd them
out. Instead, rank 0 writes its messages and the run plan to ``console.jsonl`` and step
metrics to ``metrics.jsonl`` in the run directory (shared storage, as Ray Train needs for
checkpoints), and the driver follows those files (:class:`TrainingConsole`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from actors.observe import CONSOLE_FILE

#: Poll period of the files the driver follows (seconds).
POLL_S = 0.5


def verbose() -> bool:
    """Whether Ray's own logs and the workers' raw output should reach the console."""
    if os.environ.get("TASKRAY_VERBOSE", "") not in ("", "0"):
        return True
    return os.environ.get("TASKRAY_LOG_LEVEL", "").upper() in ("DEBUG", "INFO")


def progress_bar(total: int | None, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr with rate and ETA; in a log file it redraws at most every 5 s."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        dynamic_ncols=interactive,
        mininterval=0.2 if interactive else 5.0,
        leave=True,
        file=sys.stderr,
    )


def ray_logs_dir() -> str | None:
    """Where this Ray session writes its logs (the local node's session directory)."""
    try:
        import ray

        node = ray._private.worker.global_worker.node  # no public accessor for the path
        return node.get_logs_dir_path()
    except Exception:
        return None


def quiet_ray_loggers() -> None:
    """Keep Ray's INFO and WARNING chatter (dataset plans, "progress bars disabled", Serve's
    deployment steps) in Ray's log files: only errors reach this console. Ray Data and Serve
    configure their own console handlers, so those handlers are turned down, not the loggers
    (their file handlers keep everything)."""
    import logging
    import warnings

    import ray.data  # noqa: F401  (configures its logger on import: turn it down after)

    for name in ("ray.data", "ray.serve", "ray.train", "ray.tune"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    # Ray Data's advice on its own filter API, raised once per dataset we filter.
    warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")
    # transformers draws a bar for every checkpoint it loads or writes.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _Tail:
    """New complete lines of a growing file (a partial last line waits for its newline)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being rewritten by a restarted worker
        return out


class TrainingConsole:
    """Follows a training run's ``console.jsonl`` and ``metrics.jsonl`` from the driver: a bar
    over the planned optimizer steps (loss, learning rate and tokens/s as its postfix) and each
    rank-0 message (model, resume, epoch evaluation) printed once above it.

    A no-op when :func:`verbose` is on (the workers' own output is forwarded then).
    """

    def __init__(self, run_dir: str | Path, desc: str = "train") -> None:
        self.run_dir = Path(run_dir)
        self.desc = desc
        self.enabled = not verbose()
        self.bar: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events = _Tail(self.run_dir / CONSOLE_FILE)
        self._metrics = _Tail(self.run_dir / "metrics.jsonl")

    def __enter__(self) -> TrainingConsole:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="taskray-console", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # what the last poll missed
        if self.bar is not None:
            if exc_type is None and self.bar.total:
                # The last steps are logged only every training.log_every steps.
                self.bar.n = self.bar.total
            self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        for event in self._events.read():
            if event.get("kind") == "plan":
                self._plan(event)
            elif event.get("kind") == "line":
                self._write(str(event.get("text", "")))
        for row in self._metrics.read():
            if "loss" in row and "step" in row:
                self._step(row)

    def _plan(self, event: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = progress_bar(int(event["total_steps"]), self.desc, "step")
        else:  # a restarted worker group plans again
            self.bar.total = int(event["total_steps"])
        self.bar.n = int(event.get("start_step", 0))
        self.bar.refresh()

    def _step(self, row: dict[str, Any]) -> None:
        if self.bar is None:
            self.bar = progress_bar(None, self.desc, "step")
        self.bar.set_postfix(
            loss=f"{row['loss']:.4f}",
            lr=f"{row.get('lr', 0.0):.2e}",
            tok_s=f"{row.get('tokens_per_s', 0.0):,.0f}",
            refresh=False,
        )
        self.bar.update(max(0, int(row["step"]) - self.bar.n))

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
