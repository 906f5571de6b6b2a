"""Prefill in the continuous-batching engine, in process: what packing newcomers into one row
and reusing kept prompt K/V (prefix caching) save when requests arrive together.

    python benchmarks/prefill.py            # ~2 minutes on 2 cores
    python benchmarks/prefill.py --smoke    # seconds; what CI runs

The model is the Serve benchmark's ``small`` llama (6 layers, h=384, random weights), one CPU
thread as a generator replica runs it. Bursts of w requests (w = 4, 16) are submitted at once,
8 greedy tokens each, under six engine settings: ``padded`` (newcomers left-padded to the
longest prompt, as before packing), ``packed`` (one row, block mask) or ``auto`` (the engine's
choice between the two by estimated FLOPs: its default), each with the prefix cache off or on. Two
workloads: ``varied`` (user messages of different lengths, nothing shared) and ``system`` (the
same messages after one shared system prompt, as chat clients send them). Each setting first
runs one unmeasured burst (it warms the prefix cache, as a running server's earlier requests
would). Reported per cell: the mean time from submit to first token (the engine's own latency
counters), the engine's prefill seconds per burst and the prompt tokens it actually ran.

Every completion is checked against ``model.generate`` alone for its prompt (greedy: the
tokens must be the same); any mismatch makes the script exit 1. Writes
benchmarks/results/prefill[-smoke].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine import ContinuousBatchingEngine, EngineLimits
from actors.generation import Completion, SamplingParams
from benchmarks.serve_bench.generator import build_tiny_lm
from benchmarks.serve_bench.workload import GEN_MODELS, REVIEWS

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEM = (
    "You are the support assistant of an online shop. Read the customer's review, decide "
    "whether it is positive or negative, and answer in one polite sentence that thanks them "
    "or apologises and offers help. Never promise refunds.\n\nReview: "
)
# engine.packing (False: left-padded, True: packed wherever possible, None: the engine's
# choice by estimated FLOPs, its default under SDPA), prefix_cache_tokens
SETTINGS: dict[str, tuple[bool | None, int]] = {
    "padded": (False, 0), "packed": (True, 0), "auto": (None, 0),
    "padded+prefix": (False, 4096), "packed+prefix": (True, 4096), "auto+prefix": (None, 4096),
}  # fmt: skip


def workload(name: str, width: int, burst: int) -> list[str]:
    """The prompts of one burst: reviews (cycled, a different slice per burst), alone or
    after the shared system prompt."""
    start = burst * width
    # numbered like tickets, so that no two share a first block (reviews repeat past 30)
    texts = [f"#{start + i}: {REVIEWS[(start + i) % len(REVIEWS)]}" for i in range(width)]
    return texts if name == "varied" else [SYSTEM + t for t in texts]


def run_burst(engine: ContinuousBatchingEngine, prompts: list[str], tokens: int
              ) -> list[tuple[Completion, str]]:  # fmt: skip
    """Submit every prompt while the engine waits for its lock (greedy, ``tokens`` new tokens
    each) → each one's completion and its streamed pieces joined."""
    done = [threading.Event() for _ in prompts]
    out: list[Any] = [None] * len(prompts)
    pieces: list[list[str]] = [[] for _ in prompts]

    def sink(i: int) -> Any:
        def receive(kind: str, payload: Any) -> None:
            if kind == "text":
                pieces[i].append(payload)
            elif kind in ("done", "error"):
                out[i] = payload
                done[i].set()

        return receive

    with engine.lock:
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, SamplingParams(max_new_tokens=tokens), None, sink(i))
    for event in done:
        if not event.wait(600):
            raise TimeoutError("a burst did not finish in 600 s")
    errors = [x for x in out if isinstance(x, Exception)]
    if errors:
        raise errors[0]
    return [(x, "".join(p)) for x, p in zip(out, pieces, strict=True)]


def measure(model: Any, tok: Any, setting: str, name: str, width: int, bursts: int,
            tokens: int) -> tuple[dict[str, Any], dict[str, list[int]]]:  # fmt: skip
    """One cell: ``bursts`` measured bursts after one warm-up → figures, ids per prompt."""
    packing, cache = SETTINGS[setting]
    engine = ContinuousBatchingEngine(model, tok, EngineLimits(prefix_cache_tokens=cache))
    engine.packing = packing
    ids: dict[str, list[int]] = {}
    try:
        run_burst(engine, workload(name, width, bursts), tokens)  # warm-up, not measured
        before = engine.stats()
        for burst in range(bursts):
            prompts = workload(name, width, burst)
            done = run_burst(engine, prompts, tokens)
            ids.update(zip(prompts, (c.token_ids for c, _ in done), strict=True))
        after = engine.stats()
    finally:
        engine.close()
    requests = after["latency_s"]["requests"] - before["latency_s"]["requests"]
    first = after["latency_s"]["first_token"] - before["latency_s"]["first_token"]

    def delta(key: str) -> int:
        return int(after.get(key, 0) - before.get(key, 0))

    row = {
        "first_token_ms": 1000 * first / requests,
        "prefill_ms_per_burst": 1000
        * (after["seconds"]["prefill"] - before["seconds"]["prefill"])
        / bursts,
        "prompt_tokens_run_per_burst": delta("prefill_tokens") / bursts,
        "prompt_tokens_reused_per_burst": delta("prefix_tokens") / bursts,
        "packed_forwards": delta("packed_prefills"),
    }
    return row, ids


def main() -> None:
    """The command line: every cell, the table, the JSON, the equality check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, width 4; seconds")
    parser.add_argument("--bursts", type=int, default=5, help="measured bursts per cell")
    args = parser.parse_args()
    size = "toy" if args.smoke else "small"
    widths = (4,) if args.smoke else (4, 16)
    bursts = 1 if args.smoke else args.bursts
    tokens = 4 if args.smoke else 8
    torch.set_num_threads(1)  # as a generator replica with num_cpus < 2 runs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_lm(Path(tmp) / "lm", size)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"prefill: {size} llama ({millions:.1f}M parameters), bursts of {widths} requests, "
          f"{tokens} greedy tokens, 1 thread")  # fmt: skip
    cells: dict[str, Any] = {}
    ids: dict[str, list[int]] = {}
    header = f"{'workload':>8} {'w':>3} {'setting':>14} {'first token ms':>15} " \
             f"{'prefill ms/burst':>17} {'tokens run':>11} {'reused':>7}"  # fmt: skip
    print(header)
    for name in ("varied", "system"):
        for width in widths:
            for setting in SETTINGS:
                row, got = measure(model, tok, setting, name, width, bursts, tokens)
                ids.update(got)
                cells[f"{name}/{width}/{setting}"] = row
                print(f"{name:>8} {width:>3} {setting:>14} {row['first_token_ms']:>15.1f} "
                      f"{row['prefill_ms_per_burst']:>17.1f} "
                      f"{row['prompt_tokens_run_per_burst']:>11.0f} "
                      f"{row['prompt_tokens_reused_per_burst']:>7.0f}", flush=True)  # fmt: skip
    mismatches = 0
    for prompt, got in ids.items():
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        want = out[0, enc["input_ids"].shape[1] :].tolist()
        mismatches += got != want[: len(got)]
    print(f"completions differing from generate alone: {mismatches} of {len(ids)}")
    ratios = {
        f"{name}/{width}/{setting}_first_token_vs_padded": cells[f"{name}/{width}/{setting}"][
            "first_token_ms"] / cells[f"{name}/{width}/padded"]["first_token_ms"]
        for name in ("varied", "system") for width in widths for setting in SETTINGS
    }  # fmt: skip
    report = {
        "model": f"tiny:llama config with {GEN_MODELS[size]}, random weights (seed 0)",
        "size": size,
        "torch_threads": 1,
        "max_tokens": tokens,
        "bursts_per_cell": bursts,
        "cells": cells,
        "ratios": ratios,
        "text_mismatches": mismatches,
        "smoke": args.smoke,
    }
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / f"prefill{'-smoke' if args.smoke else ''}.json"
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")
    if mismatches:
        sys.exit(f"{mismatches} completion(s) differ from generate alone")


if __name__ == "__main__":
    main()
