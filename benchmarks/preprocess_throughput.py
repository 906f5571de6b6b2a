"""Preprocessing throughput on this machine: taskray's Ray Data pipeline (read → validate →
tokenise in an actor pool → pack) vs Hugging Face `datasets.map(num_proc=2)` doing the same
work with the same functions on the same rows.

    python benchmarks/preprocess_throughput.py            # 50k rows (a few minutes on 2 cores)
    python benchmarks/preprocess_throughput.py --smoke    # 2k rows; what CI runs

Prints a table and writes benchmarks/results/preprocess_throughput.{json,png}. Both sides call
the project's own `validate_batch`, `TokenizeRows` and `pack_batch`, so the difference is the
engine. Ray Data's gain is scale-out across nodes; on one 2-core machine it should hold its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.packing import pack_batch
from actors.preprocess import TokenizeRows, validate_batch
from actors.tiny import tiny_model_path
from tasks import get_task

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 256
WINDOW = 2048
SUBJECTS = [
    "the quarterly report", "a hiking trail", "the new espresso machine", "our onboarding flow",
    "the city council vote", "a sourdough recipe", "the train timetable", "a password manager",
]  # fmt: skip
VERBS = ["Summarise", "Explain", "Describe", "Write a short note about", "Give three tips on"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Generation rows with a skewed completion length (short answers common, long ones rare)."""
    rng = random.Random(seed)
    words = ["the", "a", "of", "to", "and", "in", "is", "it", "for", "on", "with", "as"]
    words += [w for s in SUBJECTS for w in s.split()]
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(VERBS)} {rng.choice(SUBJECTS)}."
        length = int(min(150, max(3, rng.lognormvariate(3.0, 0.8))))
        rows.append({"prompt": prompt, "completion": " ".join(rng.choices(words, k=length))})
    return rows


def ray_pipeline(path: str, spec: dict, tokenizer: str, actors: int) -> tuple[int, float]:
    import ray.data

    from cluster.data import read_rows

    t0 = time.perf_counter()
    ds = (
        read_rows([path])
        .map_batches(validate_batch, fn_kwargs={"task_spec": spec}, batch_format="numpy")
        .filter(lambda r: r["_error"] == "")
        .map_batches(
            TokenizeRows,
            fn_constructor_kwargs={"task_spec": spec, "tokenizer_path": tokenizer},
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_format="numpy",
            batch_size=256,
        )
        .filter(lambda r: r["_error"] == "")
        .map_batches(
            pack_batch,
            fn_kwargs={"max_length": MAX_LENGTH},
            batch_size=WINDOW,
            batch_format="numpy",
        )
        .materialize()
    )
    packed = ds.count()
    return packed, time.perf_counter() - t0


def _np(batch: dict[str, list]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in batch.items():
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        out[k] = arr
    return out


def _lists(batch: dict[str, Any]) -> dict[str, list]:
    return {
        k: [x.tolist() if isinstance(x, np.ndarray) else x for x in v] for k, v in batch.items()
    }


def hf_pipeline(path: str, spec: dict, tokenizer: str, procs: int) -> tuple[int, float]:
    import datasets

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    raw = datasets.load_dataset("text", data_files=path, split="train", keep_in_memory=True)
    raw = raw.map(
        lambda b, idx: {"_raw": b["text"], "_path": [path] * len(idx), "_row": idx},
        with_indices=True,
        batched=True,
        remove_columns=["text"],
        num_proc=procs,
    )
    validated = raw.map(
        lambda b: _lists(validate_batch(_np(b), spec)), batched=True, num_proc=procs
    ).filter(lambda b: [e == "" for e in b["_error"]], batched=True, num_proc=procs)
    tokenize = None

    def tok(b: dict[str, list]) -> dict[str, list]:
        nonlocal tokenize
        tokenize = tokenize or TokenizeRows(spec, tokenizer)  # once per process, like an actor
        return _lists(tokenize(_np(b)))

    encoded = validated.map(
        tok,
        batched=True,
        batch_size=256,
        num_proc=procs,
        remove_columns=validated.column_names,
    ).filter(lambda b: [e == "" for e in b["_error"]], batched=True, num_proc=procs)
    packed = encoded.map(
        lambda b: pack_batch(b, MAX_LENGTH),
        batched=True,
        batch_size=WINDOW,
        num_proc=procs,
        remove_columns=encoded.column_names,
    )
    return len(packed), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2k rows, seconds")
    parser.add_argument("--rows", type=int, help="rows to process (default 50000)")
    args = parser.parse_args()
    n = args.rows or (2000 if args.smoke else 50_000)
    cpus = os.cpu_count() or 2
    procs = min(2, cpus)

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    tokenizer = tiny_model_path("tiny:llama")
    spec = get_task("generation", max_length=MAX_LENGTH).spec()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w") as f:
            for row in make_rows(n):
                f.write(json.dumps(row) + "\n")
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf-cache")
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            # One CPU stays free for the read, validate and pack tasks: an actor pool holding
            # every CPU would starve the streaming pipeline's other operators.
            ray_packed, ray_s = ray_pipeline(path, spec, tokenizer, actors=max(1, cpus - 1))
        finally:
            ray.shutdown()
        hf_packed, hf_s = hf_pipeline(path, spec, tokenizer, procs)

    results = {"ray_data": n / ray_s, "datasets_map": n / hf_s}
    report = {
        "rows": n,
        "cpus": cpus,
        "max_length": MAX_LENGTH,
        "packed_rows": {"ray_data": ray_packed, "datasets_map": hf_packed},
        "seconds": {"ray_data": ray_s, "datasets_map": hf_s},
        "rows_per_s": results,
        "ratio_ray_vs_datasets": results["ray_data"] / results["datasets_map"],
        "smoke": args.smoke,
    }
    print(f"{n:,} generation rows, validate → tokenise → pack to {MAX_LENGTH} tokens, {cpus} CPUs")
    print(f"{'engine':<14} {'seconds':>9} {'rows/s':>10} {'packed rows':>12}")
    for name in results:
        print(
            f"{name:<14} {report['seconds'][name]:>9.1f} {results[name]:>10,.0f} "
            f"{report['packed_rows'][name]:>12,}"
        )
    print(f"ray_data / datasets_map: {report['ratio_ray_vs_datasets']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    (RESULTS / f"preprocess_throughput{suffix}.json").write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(list(results), list(results.values()), color=["#2a7", "#999"])
        ax.set_ylabel("rows / s")
        ax.set_title(f"validate → tokenise → pack ({n:,} rows, {cpus} CPUs)")
        fig.tight_layout()
        fig.savefig(RESULTS / f"preprocess_throughput{suffix}.png", dpi=120)
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")
    if ray_packed != hf_packed:
        # Packing windows cut differently only if the engines batch differently; report it.
        print(f"note: packed row counts differ ({ray_packed} vs {hf_packed})")


if __name__ == "__main__":
    main()
