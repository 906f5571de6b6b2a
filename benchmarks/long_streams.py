"""Long completions in the continuous-batching engine, in process: what decoding each running
sequence's text one token at a time saves against decoding it whole at every step, what
handing decode steps their attention masks ready-made saves against transformers building
them from the 2D mask at every step, and how the engine keeps up with static batched
``generate`` as completions grow.

    python benchmarks/long_streams.py            # ~1.5 minutes on 2 cores
    python benchmarks/long_streams.py --smoke    # seconds; what CI runs
    python benchmarks/long_streams.py --tokenizer byte-fallback   # a Llama-2-style tokenizer

The model is the Serve benchmark's ``toy`` llama (2 layers, h=64, random weights), whose steps
are cheap enough to show what the engine spends besides the model; one CPU thread, as a
generator replica runs it. Per length (64, 256, 512 new tokens a request), 32 greedy requests
(two waves' worth at 16 running sequences) go through the engine three times: as it runs by
default (token-by-token text decoding with tokenizers' ``DecodeStream``, ready-made decode
masks), decoding every sequence's text whole at every step (what the engine did before; its
cost grows with the square of the length), and with 2D decode masks (what it did before
ready-made ones, and does for models its start-up check refuses). The same 32 prompts then
run through ``model.generate`` in two batches of 16. Reported per length: tokens a second of
each (the best of ``--passes``) and the ratios.

``--tokenizer byte-fallback`` swaps the toy's byte-level BPE for a tokenizer laid out as
Llama 2's, Mistral's and Gemma's (``actors.tiny.byte_fallback_tokenizer``: bytes as
``<0xNN>`` tokens, whose runs the engine streams once they are closed) and the model's
vocabulary for its own (random weights, seed 0, the byte tokens' output rows scaled down so
that, as from a trained model, a few percent of the output are bytes). Its whole-text run is
what the engine did for such tokenizers before it could stream them.

The engine runs must produce the same tokens, and the first two the same texts, each text its
ids decoded whole and the streamed pieces joined; any difference makes the script exit 1.
Writes
benchmarks/results/long_streams[-byte-fallback][-smoke].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine import ContinuousBatchingEngine, EngineLimits, byte_runs
from actors.generation import Completion
from actors.tiny import byte_fallback_tokenizer
from benchmarks.prefill import run_burst
from benchmarks.serve_bench.generator import build_tiny_lm
from benchmarks.serve_bench.workload import REVIEWS

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH = 16  # running sequences
BYTE_ROW_SCALE = 0.65  # --tokenizer byte-fallback: the byte tokens' output rows, scaled


def prompts(n: int) -> list[str]:
    """``n`` short prompts that ask for a long answer."""
    return [f"Reply to review #{i} at length: {REVIEWS[i % len(REVIEWS)]}" for i in range(n)]


def run_engine(model: Any, tok: Any, texts: list[str], tokens: int, whole: bool = False,
               masks_2d: bool = False) -> tuple[float, list[Completion], list[str]]:  # fmt: skip
    """Every prompt through one engine at once (``whole``: texts decoded whole at every step;
    ``masks_2d``: decode steps given the 2D padding mask, which transformers turns into the
    attention mask at every step) → (tokens a second, the completions, each one's streamed
    pieces joined)."""
    engine = ContinuousBatchingEngine(model, tok, EngineLimits(max_running=WIDTH))
    if whole:  # the engine's fallback for tokenizers it cannot stream (and, without runs of
        # bytes held back, what it did for byte-fallback ones before it could stream them)
        engine._streaming = None
        engine._byte_runs = None
    if masks_2d:
        engine._ready_masks = False  # the engine's way for models its start-up check refuses
    try:
        start = time.perf_counter()
        done = run_burst(engine, texts, tokens)
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    completions = [c for c, _ in done]
    return (sum(c.completion_tokens for c in completions) / seconds, completions,
            [joined for _, joined in done])  # fmt: skip


def run_generate(model: Any, tok: Any, texts: list[str], tokens: int) -> float:
    """The prompts through ``model.generate`` in left-padded batches of ``WIDTH`` → tokens a
    second (tokens up to each row's EOS, as the engine counts them)."""
    tok.padding_side = "left"
    generated = 0
    start = time.perf_counter()
    for i in range(0, len(texts), WIDTH):
        enc = tok(texts[i : i + WIDTH], return_tensors="pt", padding=True,
                  add_special_tokens=False)  # fmt: skip
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            ended = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            generated += ended
    return generated / (time.perf_counter() - start)


def toy(directory: Path, tokenizer: str) -> tuple[Any, Any]:
    """The toy llama and its tokenizer; for ``byte-fallback`` a Llama-2-style tokenizer and
    the same model built for its vocabulary (random weights, seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_lm(directory, "toy")
    if tokenizer == "byte-level":
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        return model, AutoTokenizer.from_pretrained(path)
    tok = byte_fallback_tokenizer()
    config = AutoConfig.from_pretrained(path)
    config.update({"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                   "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random weights pick byte tokens (two thirds of this vocabulary) most of the time; a
    # trained model writes mostly pieces of its vocabulary. Their output rows scaled down
    # leave bytes a few percent of the output (``byte_token_share`` in the report).
    with torch.no_grad():
        model.lm_head.weight[3:259] *= BYTE_ROW_SCALE
    return model, tok


def main() -> None:
    """The command line: every length, the table, the JSON, the equality check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="short lengths, one pass; seconds")
    parser.add_argument("--passes", type=int, default=3, help="measurements per cell (best)")
    parser.add_argument(
        "--tokenizer",
        choices=("byte-level", "byte-fallback"),
        default="byte-level",
        help="the toy's byte-level BPE, or a Llama-2-style one with byte fallback",
    )
    args = parser.parse_args()
    lengths = (16, 48) if args.smoke else (64, 256, 512)
    passes = 1 if args.smoke else args.passes
    count = 2 * WIDTH
    torch.set_num_threads(1)  # as a generator replica with num_cpus < 2 runs
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = toy(Path(tmp) / "lm", args.tokenizer)
    texts = prompts(count)
    print(f"long_streams: toy llama, {args.tokenizer} tokenizer, {count} greedy requests, "
          f"{WIDTH} running, 1 thread, best of {passes}")  # fmt: skip
    print(f"{'tokens':>7} {'engine tok/s':>13} {'whole-decode':>13} {'2D masks':>9} "
          f"{'generate':>9} {'engine/whole':>13} {'engine/2D':>10} "
          f"{'engine/generate':>16}")  # fmt: skip
    run_engine(model, tok, texts[:WIDTH], lengths[0], whole=False)  # warm-up, not measured
    run_generate(model, tok, texts[:WIDTH], lengths[0])
    cells: dict[str, Any] = {}
    differing = 0
    runs = byte_runs(tok)
    byte_tokens = generated = 0
    for tokens in lengths:
        best = {"engine": 0.0, "whole_decode": 0.0, "masks_2d": 0.0, "generate": 0.0}
        for _ in range(passes):
            rate, streamed, joined = run_engine(model, tok, texts, tokens)
            if runs is not None:
                generated += sum(len(c.token_ids) for c in streamed)
                byte_tokens += sum(t in runs.ids for c in streamed for t in c.token_ids)
            best["engine"] = max(best["engine"], rate)
            rate, whole, _ = run_engine(model, tok, texts, tokens, whole=True)
            best["whole_decode"] = max(best["whole_decode"], rate)
            rate, masked, _ = run_engine(model, tok, texts, tokens, masks_2d=True)
            best["masks_2d"] = max(best["masks_2d"], rate)
            differing += sum(a.token_ids != b.token_ids for a, b in zip(streamed, masked,
                                                                         strict=True))  # fmt: skip
            best["generate"] = max(best["generate"], run_generate(model, tok, texts, tokens))
            for a, b, pieces in zip(streamed, whole, joined, strict=True):
                decoded = tok.decode(a.token_ids, skip_special_tokens=True)
                differing += (a.token_ids != b.token_ids or a.text != b.text
                              or a.text != decoded or pieces != a.text)  # fmt: skip
        cell = {f"{k}_tok_s": v for k, v in best.items()}
        cell["engine_vs_whole_decode"] = best["engine"] / best["whole_decode"]
        cell["engine_vs_generate"] = best["engine"] / best["generate"]
        cell["whole_decode_vs_generate"] = best["whole_decode"] / best["generate"]
        cell["engine_vs_masks_2d"] = best["engine"] / best["masks_2d"]
        cells[str(tokens)] = cell
        print(f"{tokens:>7} {best['engine']:>13.0f} {best['whole_decode']:>13.0f} "
              f"{best['masks_2d']:>9.0f} {best['generate']:>9.0f} "
              f"{cell['engine_vs_whole_decode']:>12.2f}x {cell['engine_vs_masks_2d']:>9.2f}x "
              f"{cell['engine_vs_generate']:>15.2f}x", flush=True)  # fmt: skip
    print("completions whose tokens or text differ between the two decodings or with 2D "
          f"masks, or whose streamed pieces do not join to their text: {differing}")  # fmt: skip
    report = {
        "model": "tiny:llama's config, random weights (seed 0)",
        "tokenizer": args.tokenizer,
        "requests": count,
        "running": WIDTH,
        "torch_threads": 1,
        "passes": passes,
        "cells": cells,
        "text_mismatches": differing,
        "byte_token_share": byte_tokens / generated if generated else None,
        "smoke": args.smoke,
    }
    RESULTS.mkdir(exist_ok=True)
    variant = "-byte-fallback" if args.tokenizer == "byte-fallback" else ""
    out_path = RESULTS / f"long_streams{variant}{'-smoke' if args.smoke else ''}.json"
    out_path.write_text(json.dumps(report, indent=2))
    if generated:
        print(f"byte tokens: {byte_tokens / generated:.1%} of the engine's output")
    print(f"wrote {out_path}")
    if differing:
        sys.exit(f"{differing} completion(s) differ")


if __name__ == "__main__":
    main()
