"""Continuous batching for an encoder-decoder, in process: taskray's engine
(``actors.engine.ContinuousBatchingEngine``) against ``model.generate`` on a T5-shaped or a
BART-shaped model with random weights, one CPU thread, greedy decoding or (``--beams``) the
beam search a model's generation_config asks for, as published summarizers and translators do.

    python benchmarks/seq2seq_engine.py                  # T5, ~2 minutes on 2 cores
    python benchmarks/seq2seq_engine.py --family bart    # BART (absolute decoder positions)
    python benchmarks/seq2seq_engine.py --beams 4        # beam search, each request 4 rows
    python benchmarks/seq2seq_engine.py --smoke [--family bart] [--beams 3]  # what CI runs

For each width w in 1, 4, 8, 16 it measures, over the same 2w prompts:
- ``static``: ``generate`` over w prompts at once (right-padded encoder inputs), twice,
  tokens/s: what static batching reaches when w requests happen to arrive together;
- ``engine``: w closed-loop clients on the engine (each submits its next prompt when its
  previous one is done), tokens/s: requests joining and leaving a running batch, as the Serve
  generator runs them;
- ``alone``: one ``generate`` per request, one after another: what a server without
  continuous batching gives concurrent streams (each stream runs its own ``generate`` under
  the replica's model lock), which is how taskray served seq2seq streams before.

Every engine completion is checked against ``generate`` alone for its prompt (greedy or beam
search: the text must be the same); any mismatch makes the script exit 1. Prints a table and
writes benchmarks/results/seq2seq_engine[-bart][-beamsN][-smoke].json. Ratios are between
figures of one invocation. With beams, the engine may run every request's beams at once
(``max_running`` = width x beams, as ``generate`` holds them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine import ContinuousBatchingEngine, EngineLimits
from benchmarks.serve_bench.baselines import engine_closed_loop
from benchmarks.serve_bench.workload import PROMPTS

RESULTS = Path(__file__).resolve().parent / "results"
# T5-shaped sizes over ``tiny:t5``'s config. T5's own init at these depths decodes one token
# over and over; weights drawn 5x wider give varied text, so equality checks mean something.
SIZES: dict[str, dict[str, Any]] = {
    "toy": {"initializer_factor": 5.0},
    "small": {"d_model": 384, "d_kv": 64, "d_ff": 1536, "num_layers": 6,
              "num_decoder_layers": 6, "num_heads": 6, "initializer_factor": 5.0},
}  # fmt: skip
# BART-shaped sizes of the same widths and depths (``actors.tiny.tiny_bart``: BART's config,
# ``tiny:t5``'s tokenizer, position tables and cross-attention widened so that equality checks
# tell a row given another's position).
BART_SIZES: dict[str, dict[str, Any]] = {
    "toy": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128, "encoder_attention_heads": 4, "decoder_attention_heads": 4},
    "small": {"d_model": 384, "encoder_layers": 6, "decoder_layers": 6,
              "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "encoder_attention_heads": 6,
              "decoder_attention_heads": 6},
}  # fmt: skip


def build(size: str, family: str = "t5") -> tuple[Any, Any]:
    """(model, tokenizer) of ``SIZES[size]`` (or ``BART_SIZES[size]``), random weights (seed
    0)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from actors.tiny import tiny_bart, tiny_model_path

    if family == "bart":
        return tiny_bart("bart", 10.0, max_position_embeddings=512, **BART_SIZES[size])
    source = tiny_model_path("tiny:t5")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source, **SIZES[size])
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    return model, AutoTokenizer.from_pretrained(source)


class Bench:
    """The three ways of generating over one model (see the module docstring)."""

    def __init__(self, model: Any, tok: Any, max_tokens: int, beams: int = 1) -> None:
        self.model, self.tok, self.max_tokens, self.beams = model, tok, max_tokens, beams
        model.generation_config.num_beams = beams
        self.eos = tok.eos_token_id
        self.reference = {p: self._texts([p])[0] for p in PROMPTS}
        self.mismatches = 0

    def _texts(self, rows: list[str]) -> list[str]:
        out = self._generate(rows)[0]
        return [self.tok.decode(r, skip_special_tokens=True) for r in out]

    def _generate(self, rows: list[str]) -> tuple[list[list[int]], float]:
        """Generated ids per row (up to EOS, which counts) and the wall seconds."""
        self.tok.padding_side = "right"
        enc = self.tok(rows, return_tensors="pt", add_special_tokens=False, padding=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_tokens, do_sample=False,
                pad_token_id=self.tok.pad_token_id, eos_token_id=self.eos,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
        ids = [r[1:] for r in out.tolist()]  # without the decoder start token
        return [r[: r.index(self.eos) + 1] if self.eos in r else r for r in ids], seconds

    def static(self, width: int, n: int) -> tuple[int, float]:
        """The first ``n`` prompts (cycled), one ``generate`` per ``width`` of them → tokens,
        seconds."""
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        tokens = seconds = 0.0
        for start in range(0, n, width):
            ids, s = self._generate(prompts[start : start + width])
            tokens, seconds = tokens + sum(map(len, ids)), seconds + s
        return int(tokens), seconds

    def alone(self, n: int) -> tuple[int, float]:
        """``n`` prompts, one ``generate`` after another → tokens, seconds."""
        tokens = seconds = 0.0
        for i in range(n):
            ids, s = self._generate([PROMPTS[i % len(PROMPTS)]])
            tokens, seconds = tokens + len(ids[0]), seconds + s
        return int(tokens), seconds

    def engine(self, width: int, n: int) -> tuple[int, float, float]:
        """``width`` closed-loop clients, ``n`` requests → tokens, seconds, mean decode batch."""

        def check(job: tuple[str, str | None, int], text: str | None) -> None:
            self.mismatches += text != self.reference[job[0]]

        jobs = [(p, None, self.max_tokens) for p in PROMPTS]
        limits = EngineLimits(max_running=max(32, width * self.beams))
        engine = ContinuousBatchingEngine(self.model, self.tok, limits)
        try:
            tokens, seconds = engine_closed_loop(engine, jobs, width, n, check)
            sizes = engine.stats()["decode_batch_sizes"]
        finally:
            engine.close()
        mean_batch = sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values()))
        return tokens, seconds, mean_batch


def main() -> None:
    """The command line: measure each width, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy model, 2 widths; seconds")
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default: small)")
    parser.add_argument(
        "--family",
        choices=("t5", "bart"),
        default="t5",
        help="T5-shaped (relative positions) or BART-shaped (absolute)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
    parser.add_argument("--passes", type=int, default=3, help="measurements pooled per width")
    args = parser.parse_args()
    size = args.size or ("toy" if args.smoke else "small")
    widths = (1, 4) if args.smoke else (1, 4, 8, 16)
    passes = 1 if args.smoke else args.passes
    torch.set_num_threads(1)  # as a generator replica with num_cpus < 2 runs
    model, tok = build(size, args.family)
    params = sum(p.numel() for p in model.parameters())
    how = "greedy" if args.beams == 1 else f"{args.beams}-beam search"
    print(f"seq2seq engine: {size} {args.family.upper()} ({params / 1e6:.1f}M parameters), "
          f"{args.max_tokens} {how} tokens per request, 1 thread", flush=True)  # fmt: skip
    bench = Bench(model, tok, args.max_tokens, args.beams)
    distinct = len(set(bench.reference.values()))
    if distinct < len(PROMPTS) // 2:  # equality with generate would then prove little
        sys.exit(f"only {distinct} distinct reference texts over {len(PROMPTS)} prompts")
    bench.static(2, 2)  # warm-up (and of the engine: its first request pays one-time costs)
    bench.engine(1, 1)
    rows: dict[str, Any] = {}
    print(f"{'width':>5} {'static tok/s':>13} {'engine tok/s':>13} {'alone tok/s':>12} "
          f"{'engine/static':>14} {'engine/alone':>13} {'mean batch':>11}")  # fmt: skip
    for w in widths:
        static = [bench.static(w, 2 * w) for _ in range(passes)]
        engine = [bench.engine(w, 2 * w) for _ in range(passes)]
        alone = [bench.alone(2 * w) for _ in range(passes)]
        rate = {
            "static": sum(n for n, _ in static) / sum(s for _, s in static),
            "engine": sum(n for n, _, _ in engine) / sum(s for _, s, _ in engine),
            "alone": sum(n for n, _ in alone) / sum(s for _, s in alone),
        }
        row = {
            **{f"{k}_tok_s": v for k, v in rate.items()},
            "engine_over_static": rate["engine"] / rate["static"],
            "engine_over_alone": rate["engine"] / rate["alone"],
            "engine_mean_decode_batch": sum(b for _, _, b in engine) / len(engine),
        }
        rows[str(w)] = row
        print(f"{w:>5} {rate['static']:>13.0f} {rate['engine']:>13.0f} {rate['alone']:>12.0f} "
              f"{row['engine_over_static']:>13.2f}x {row['engine_over_alone']:>12.2f}x "
              f"{row['engine_mean_decode_batch']:>11.1f}", flush=True)  # fmt: skip
    print(f"engine texts differing from generate alone: {bench.mismatches}")
    shape = f"tiny:t5 config with {SIZES[size]}"
    if args.family == "bart":
        shape = f"BART config with {BART_SIZES[size]}"
    report = {
        "model": f"{shape}, random weights (seed 0)",
        "family": args.family,
        "size": size,
        "parameters": params,
        "max_tokens": args.max_tokens,
        "beams": args.beams,
        "passes": passes,
        "torch_threads": 1,
        "widths": rows,
        "text_mismatches": bench.mismatches,
        "distinct_reference_texts": distinct,
        "smoke": args.smoke,
    }
    RESULTS.mkdir(exist_ok=True)
    family = "" if args.family == "t5" else f"-{args.family}"
    beams = f"-beams{args.beams}" if args.beams > 1 else ""
    path = RESULTS / f"seq2seq_engine{family}{beams}{'-smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    if bench.mismatches:
        sys.exit(f"{bench.mismatches} engine completion(s) differ from generate alone")


if __name__ == "__main__":
    main()
