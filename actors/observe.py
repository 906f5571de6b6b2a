"""Training observability: model FLOPs utilisation against a measured or configured peak,
peak memory, and the JSONL + TensorBoard sinks."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch


def measure_peak_flops(device: torch.device, seconds: float = 0.5, size: int = 1024) -> float:
    """This device's dense matmul rate (FLOP/s), measured once: the practical ceiling that
    MFU is reported against (fp32 on CPU, bf16 on GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start)


def flops_per_token(model: Any) -> float:
    """Training FLOPs per token: 6 × non-embedding parameters (forward 2N + backward 4N)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        n = base.num_parameters(exclude_embeddings=True)
    except (AttributeError, TypeError):
        n = sum(p.numel() for p in base.parameters())
    return 6.0 * float(n)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocator peak on GPU, max resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsSink:
    """Appends records to ``metrics.jsonl`` and mirrors numbers to TensorBoard (rank 0)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir, "metrics.jsonl")
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir, "tensorboard")))
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def write(self, record: dict[str, Any], step: int, prefix: str = "train") -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            self.writer.flush()


#: Rank 0's messages for the person at the console, one JSON object per line, beside
#: ``metrics.jsonl``: the driver follows both (``cluster.console``) and shows each message once,
#: whereas Ray's forwarding of worker output repeats lines and mixes in Ray's own.
CONSOLE_FILE = "console.jsonl"


def console_event(run_dir: str | Path, kind: str, **fields: Any) -> None:
    """Append one event for the driver's console: ``line`` (``text``: a message to show as is)
    or ``plan`` (``total_steps``, ``steps_per_epoch``, ``epochs``, ``start_step``)."""
    with Path(run_dir, CONSOLE_FILE).open("a") as f:
        f.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")


def say(run_dir: str | Path, text: str) -> None:
    """A rank-0 message: printed to the worker's log and sent to the driver's console."""
    print(text, flush=True)
    console_event(run_dir, "line", text=text)
