"""Training throughput on this machine: taskray's step vs a bare PyTorch loop vs the
`transformers` Trainer (same model, data and batch, one worker), padded vs packed on
length-skewed data, and MFU against this machine's measured matmul rate.

    python benchmarks/train_throughput.py            # full size (a few minutes on 2 cores)
    python benchmarks/train_throughput.py --smoke    # seconds; what CI runs

Prints a table and writes benchmarks/results/train_throughput.{json,png}. Every figure is a
ratio against a baseline measured in the same process, because machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.config import OptimOptions
from actors.observe import flops_per_token, measure_peak_flops
from actors.packing import pack_batch, packing_efficiency
from actors.steps import accumulate, collate, make_optimizer
from tasks import IGNORE_INDEX

RESULTS = Path(__file__).resolve().parent / "results"


def make_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 32),
            num_key_value_heads=max(1, hidden // 64),
            max_position_embeddings=2048,
            attn_implementation="sdpa",
        )
    )


def skewed_rows(n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Lengths from a log-normal (many short rows, a few long): where padding wastes most."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = int(min(max_length, max(8, rng.lognormvariate(math.log(max_length / 6), 0.8))))
        ids = [rng.randrange(1, vocab) for _ in range(length)]
        cut = max(1, length // 3)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


def batches(rows: list[dict], size: int) -> list[dict]:
    return [
        {k: [r[k] for r in rows[i : i + size]] for k in ("input_ids", "labels")}
        for i in range(0, len(rows), size)
    ]


def real_tokens(rows: list[dict]) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def run_taskray(model, data: list[dict], steps: int) -> float:
    """taskray's step: collate (+ packed masks), token-weighted accumulate, clip, AdamW."""
    optimizer = make_optimizer(model, OptimOptions(lr=1e-4))
    params = [p for p in model.parameters() if p.requires_grad]
    t = 0.0
    for i in range(steps + 1):
        start = time.perf_counter()
        accumulate("causal_lm", model, [collate(data[i % len(data)], 0)])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up kernels and allocators
            t += time.perf_counter() - start
    return t


def run_bare(model, data: list[dict], steps: int) -> float:
    """What a user writes by hand: pad, HF's own loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = 0.0
    for i in range(steps + 1):
        batch = data[i % len(data)]
        start = time.perf_counter()
        longest = max(len(x) for x in batch["input_ids"])
        ids = torch.zeros((len(batch["input_ids"]), longest), dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for j, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
            ids[j, : len(x)] = torch.tensor(x)
            labels[j, : len(y)] = torch.tensor(y)
            mask[j, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            t += time.perf_counter() - start
    return t


def run_trainer(model, rows: list[dict], batch_size: int, steps: int, tmp: Path) -> float:
    """The `transformers` Trainer on the same rows (its own padding collator)."""
    from transformers import Trainer, TrainingArguments

    class Collator:
        def __call__(self, features):
            return {
                k: v
                for k, v in collate(
                    {k: [f[k] for f in features] for k in ("input_ids", "labels")}, 0
                ).items()
                if k in ("input_ids", "labels", "attention_mask")
            }

    args = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=batch_size, max_steps=steps + 1,
        learning_rate=1e-4, max_grad_norm=1.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    marks: list[float] = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=Collator())
    trainer.add_callback(Clock())
    trainer.train()
    return marks[-1] - marks[0]  # steps 2..N+1, like the others (first step is warm-up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hidden, layers, max_len, n, bs, steps = (
        (64, 2, 128, 64, 8, 4) if args.smoke else (256, 4, 512, 512, 8, 24)
    )
    vocab = 2000
    rows = skewed_rows(n, max_len, vocab)
    padded = batches(rows, bs)
    packed_rows = pack_batch(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]},
        max_len,
    )
    efficiency = packing_efficiency(packed_rows["seq_lens"], max_len)
    # Same tokens per step: a packed step of k rows ≈ k × max_len slots.
    per_pack = max(1, round(bs * real_tokens(rows) / len(rows) / max_len))
    keys = ("input_ids", "labels", "position_ids", "seq_lens")
    packed = [
        {k: packed_rows[k][i : i + per_pack] for k in keys}
        for i in range(0, len(packed_rows["input_ids"]), per_pack)
    ]

    def tokens_in(data: list[dict], count: int) -> int:
        steps_data = [data[i % len(data)] for i in range(1, count + 1)]
        return sum(len(x) for batch in steps_data for x in batch["input_ids"])

    def model():
        return make_model(hidden, layers, vocab)

    peak = measure_peak_flops(torch.device("cpu"))
    flops = flops_per_token(model())
    results: dict[str, float] = {}
    results["bare"] = tokens_in(padded, steps) / run_bare(model(), padded, steps)
    results["taskray"] = tokens_in(padded, steps) / run_taskray(model(), padded, steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer_time = run_trainer(model(), rows, bs, steps, Path(tmp))
    # The Trainer samples rows at random: count its tokens as steps × batch × mean row length.
    results["trainer"] = steps * bs * real_tokens(rows) / len(rows) / trainer_time
    pack_steps = max(2, steps // 2)
    results["taskray_packed"] = tokens_in(packed, pack_steps) / run_taskray(
        model(), packed, pack_steps
    )

    report = {
        "machine": {"cpus": torch.get_num_threads(), "matmul_peak_gflops": peak / 1e9},
        "model": {"hidden": hidden, "layers": layers, "vocab": vocab, "flops_per_token": flops},
        "data": {
            "rows": n,
            "max_length": max_len,
            "batch_size": bs,
            "packing_efficiency": efficiency,
        },
        "tokens_per_s": results,
        "ratios": {
            "taskray_vs_bare": results["taskray"] / results["bare"],
            "taskray_vs_trainer": results["taskray"] / results["trainer"],
            "packed_vs_padded": results["taskray_packed"] / results["taskray"],
        },
        "mfu": {k: v * flops / peak for k, v in results.items()},
        "smoke": args.smoke,
    }
    print(
        f"matmul peak {peak / 1e9:,.1f} GFLOP/s, {flops / 1e6:.1f} MFLOP/token, "
        f"packing efficiency {efficiency:.3f}"
    )
    print(f"{'loop':<16} {'real tok/s':>12} {'MFU':>8}")
    for name, value in results.items():
        print(f"{name:<16} {value:>12,.0f} {report['mfu'][name]:>8.1%}")
    for name, value in report["ratios"].items():
        print(f"{name:<20} {value:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    (RESULTS / f"train_throughput{suffix}.json").write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(results), list(results.values()), color=["#999", "#2a7", "#77a", "#2a7"])
        ax.set_ylabel("real tokens / s")
        ax.set_title("training throughput (1 CPU worker)")
        fig.tight_layout()
        fig.savefig(RESULTS / f"train_throughput{suffix}.png", dpi=120)
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")


if __name__ == "__main__":
    main()
