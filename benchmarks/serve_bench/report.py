"""The report: the tables printed at the end of each half and the chart (top row classifier,
bottom row generator)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .classifier import TORCH_THREADS
from .common import NUM_CPUS, by_concurrency
from .workload import CONCURRENCY, GEN_MODELS, SYSTEMS, generator_key


def make_chart(report: dict[str, Any], path: Path) -> None:
    """Top row (classifier): throughput and p99 latency vs concurrency, one line per system.
    Bottom row (generator): tokens/s and time to first token, Serve streaming vs in-process."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")
        return
    rows = ["classifier"] if "results" in report else []
    rows += [generator_key(size) for size in GEN_MODELS if generator_key(size) in report]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.5, 3.8 * len(rows)), squeeze=False)
    for (left, right), row in zip(axes, rows, strict=True):
        if row == "classifier":
            _chart_classifier(report, left, right)
        else:
            _chart_generator(report[row], left, right)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _chart_classifier(report: dict[str, Any], left: Any, right: Any) -> None:
    colours = {"serve_batched": "#2a7", "serve_unbatched": "#77a", "fastapi_pipeline": "#999"}
    for system, by_c in report["results"].items():
        by_c = by_concurrency(by_c)
        xs = sorted(by_c)
        left.plot(xs, [by_c[c]["requests_per_s"] for c in xs], "o-", label=system,
                  color=colours[system])  # fmt: skip
        right.plot(xs, [by_c[c]["p99_ms"] or float("nan") for c in xs], "o-", label=system,
                   color=colours[system])  # fmt: skip
    for ax, label in ((left, "requests / s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    threads = report.get("torch_threads", TORCH_THREADS)
    left.set_title(
        f"MiniLM sentiment over HTTP ({NUM_CPUS} CPUs, {threads} torch threads)",
        fontsize=9,
        loc="left",
    )


def _chart_generator(gen: dict[str, Any], left: Any, right: Any) -> None:
    results = by_concurrency(gen["results"])
    inproc = gen["inprocess"]
    xs = sorted(results)
    static = [
        inproc[f"batch{c}"]["aggregate_tok_s"] if f"batch{c}" in inproc
        else inproc["plain"]["aggregate_tok_s"]
        for c in xs
    ]  # fmt: skip
    left.plot(xs, [results[c]["aggregate_tok_s"] for c in xs], "o-", color="#2a7",
              label="Serve, streamed (continuous batching)")  # fmt: skip
    left.plot(xs, static, "s--", color="#999", label="in-process generate, batch of c")
    engine = [inproc[f"engine{c}"]["aggregate_tok_s"] if f"engine{c}" in inproc else None
              for c in xs]  # fmt: skip
    if any(v is not None for v in engine):
        left.plot([c for c, v in zip(xs, engine, strict=True) if v is not None],
                  [v for v in engine if v is not None], "^:", color="#77a",
                  label="in-process engine, c clients (no Serve)")  # fmt: skip
    # the most Serve could deliver at each cell's costs per token (common.cpu_ceiling_tok_s)
    ceiling = [(c, gen["ratios"].get(f"cpu_ceiling_c{c}_vs_inprocess_batch{c}")) for c in xs]
    ceiling = [(c, r * static[xs.index(c)]) for c, r in ceiling if r is not None]
    if ceiling:
        left.plot(*zip(*ceiling, strict=True), "v-.", color="#c9a", ms=4,
                  label="CPU ceiling for Serve here (all cores busy)")  # fmt: skip
    mixed = gen.get("mixed")
    if mixed:
        c = mixed["concurrency"]
        left.plot([c], [mixed["aggregate_tok_s"]], "D", color="#c52",
                  label="Serve, mixed load")  # fmt: skip
        right.plot([c], [mixed["ttft_p50_ms"]], "D", color="#c52", label="mixed load p50")
    staggered = gen.get("staggered")
    if staggered:
        right.plot([staggered["concurrency"]], [staggered["ttft_p50_ms"]], "s", color="#85c",
                   label="staggered clients p50")  # fmt: skip
    right.plot(xs, [results[c]["ttft_p50_ms"] for c in xs], "o-", color="#2a7", label="p50")
    right.plot(xs, [results[c]["ttft_p99_ms"] for c in xs], "o:", color="#2a7", label="p99")
    right.axhline(inproc["streamed"]["ttft_p50_ms"], color="#999", ls="--",
                  label="in-process streamer p50 (alone)")  # fmt: skip
    for ax, label in ((left, "tokens / s (all clients)"), (right, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(c) for c in xs])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    right.set_yscale("log")
    left.set_title(
        f"{_model_name(gen)}, {gen['max_tokens']} tokens/request, greedy, "
        f"{gen['torch_threads']} torch thread",
        fontsize=9,
        loc="left",
    )


def _model_name(gen: dict[str, Any]) -> str:
    """``toy llama (0.1M)``; results written before model sizes existed were the toy's."""
    params = gen.get("parameters")
    return f"{gen.get('size', 'toy')} llama" + (f" ({params / 1e6:.1f}M)" if params else "")


def print_table(report: dict[str, Any]) -> None:
    """The figures, the ratios and whether the targets are met."""
    print(
        f"\nMiniLM sentiment, one review per request, {report['machine']['cpus']} CPUs, "
        f"{report['torch_threads']} torch threads per server; bundle: {report['bundle']['source']}"
    )
    mbs = report["serve"].get("mean_batch_size", {})
    head = (
        f"{'system':<17} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ok':>5} {'err':>4}"
    )
    print(head)
    for c in CONCURRENCY:
        for system in SYSTEMS:
            s = report["results"][system][c]
            p50 = f"{s['p50_ms']:.1f}" if s["p50_ms"] is not None else "-"
            p99 = f"{s['p99_ms']:.1f}" if s["p99_ms"] is not None else "-"
            print(
                f"{system:<17} {c:>4} {s['requests_per_s']:>8.1f} {p50:>8} {p99:>8} "
                f"{s['ok']:>5} {s['errors']:>4}"
            )
    if mbs:
        shown = ", ".join(f"c={c}: {v:.1f}" for c, v in mbs.items())
        print(f"serve_batched mean batch size: {shown}")
    top = max(CONCURRENCY)
    print(f"CPU ms per request at c={top}, by process (where the time goes):")
    for system in SYSTEMS:
        parts = report["results"][system][top].get("cpu_ms_per_request", {})
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(parts.items(), key=lambda x: -x[1])
                          if v >= 0.3)  # fmt: skip
        print(f"  {system:<17} total {sum(parts.values()):5.1f}: {shown}")
    compute = report["compute"]
    print(
        f"model alone (in-process): {compute['cpu_ms_per_row_alone']:.1f} ms CPU per review "
        f"unbatched, {compute['cpu_ms_per_row_batched']:.1f} ms in batches of "
        f"{compute['batch']}: batching can make a CPU-bound server at most "
        f"{compute['batching_ceiling']:.2f}x faster"
    )
    for name, value in report["ratios"].items():
        print(f"{name:<32} {value:.2f}x" if value is not None else f"{name:<32} -")
    for name, met in report["targets_met"].items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    errors = sum(r[c]["errors"] for r in report["results"].values() for c in CONCURRENCY)
    if errors:
        print(f"note: {errors} requests failed; see error_kinds / error_samples in the JSON")
    t = report["timings_s"]
    print(
        f"timings: bundle {t['bundle_s']:.1f}s, baseline ready {t['baseline_ready_s']:.1f}s, "
        f"ray {t['ray_start_s']:.1f}s, serve ready {t['serve_ready_s']:.1f}s, "
        f"total {t['total_s']:.1f}s"
    )


def print_generator_table(gen: dict[str, Any]) -> None:
    """The generator figures: Serve at each concurrency and under the mixed load vs
    in-process generate."""
    results = by_concurrency(gen["results"])
    inproc = gen["inprocess"]

    def fmt(value: float | None, digits: int = 1) -> str:
        return f"{value:.{digits}f}" if value is not None else "-"

    print(
        f"\n{_model_name(gen)}, random weights, {gen['max_tokens']} new tokens per request, "
        "greedy, "
        f"{gen['torch_threads']} torch thread(s), {gen['prompts']} prompts; TTFT = first "
        "non-empty text piece"
    )
    print(
        f"{'system':<24} {'conc':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'decode':>8} "
        f"{'aggr.':>8} {'ok':>5} {'err':>4}"
    )
    print(f"{'':<24} {'':>4} {'ms':>9} {'ms':>9} {'tok/s':>8} {'tok/s':>8}")
    rows = [("serve SSE", c, r) for c, r in sorted(results.items())]
    for load in ("mixed", "staggered"):
        if gen.get(load):
            rows.append((f"serve {load}", gen[load]["concurrency"], gen[load]))
    for name, c, r in rows:
        print(
            f"{name:<24} {c:>4} {fmt(r['ttft_p50_ms']):>9} {fmt(r['ttft_p99_ms']):>9} "
            f"{fmt(r['decode_tok_s_p50'], 0):>8} {fmt(r['aggregate_tok_s'], 0):>8} "
            f"{r['ok']:>5} {r['errors']:>4}"
        )
    s = inproc["streamed"]
    print(
        f"{'in-process streamer':<24} {1:>4} {fmt(s['ttft_p50_ms']):>9} "
        f"{fmt(s['ttft_p99_ms']):>9} {fmt(s['decode_tok_s_p50'], 0):>8} "
        f"{fmt(s['aggregate_tok_s'], 0):>8} {s['requests']:>5}"
    )
    plain = inproc["plain"]
    print(
        f"{'in-process generate':<24} {1:>4} {'-':>9} {'-':>9} {fmt(plain['tok_s_p50'], 0):>8} "
        f"{fmt(plain['aggregate_tok_s'], 0):>8} {plain['requests']:>5}"
    )
    for width in sorted(int(k.removeprefix("batch")) for k in inproc if k.startswith("batch")):
        for key, count in ((f"batch{width}", "calls"), (f"engine{width}", "loops")):
            if key in inproc:
                print(
                    f"{'in-process ' + key:<24} {width:>4} {'-':>9} {'-':>9} {'-':>8} "
                    f"{fmt(inproc[key]['aggregate_tok_s'], 0):>8} {inproc[key][count]:>5}"
                )
    mixed_key = next((k for k in inproc if k.startswith("engine_mixed")), None)
    if mixed_key is not None:
        print(
            f"{'in-process engine, mixed':<24} {mixed_key.removeprefix('engine_mixed'):>4} "
            f"{'-':>9} {'-':>9} {'-':>8} {fmt(inproc[mixed_key]['aggregate_tok_s'], 0):>8} "
            f"{inproc[mixed_key]['loops']:>5}"
        )
    usage = gen["usage_check"]
    print(
        "non-streamed check: texts "
        + ("equal" if usage["texts_equal"] else "NOT equal")
        + " to greedy in-process; usage.completion_tokens "
        + ("equals" if usage["usage_equals_generated"] else "differs from")
        + f" tokens generated ({usage['completion_tokens']} vs {usage['generated_tokens']})"
    )
    for name, c, r in rows:
        extra = []
        if r["text_mismatches"]:
            extra.append(f"{r['text_mismatches']} texts differ from greedy in-process")
        reasons = ", ".join(f"{k} {v}" for k, v in r["finish_reasons"].items())
        parts = ", ".join(
            f"{k} {v:.2f}"
            for k, v in sorted(r["cpu_ms_per_token"].items(), key=lambda x: -x[1])
            if v >= 0.02
        )
        total = sum(r["cpu_ms_per_token"].values())
        split = r.get("cpu_ms_per_token_split")
        if split:  # the model's steps against everything else (transport, clients, Ray)
            parts += (
                f" (engine thread {split['engine_thread']:.2f}, everything else "
                f"{split['everything_else']:.2f})"
            )
        print(
            f"  {name} c={c}: finish {reasons}; CPU ms per token {total:.2f}: {parts}"
            + (f"; {'; '.join(extra)}" if extra else "")
        )
    for name, value in gen["ratios"].items():
        unit = " ms" if "overhead" in name else "x"
        print(
            f"{name:<48} {value:+.1f}{unit}"
            if unit == " ms" and value is not None
            else f"{name:<48} {fmt(value, 2)}{unit}"
        )
    t = gen["timings_s"]
    print(
        f"timings: model {t['model_s']:.1f}s, ray "
        + (f"{t['ray_start_s']:.1f}s" if t["ray_start_s"] else "(shared)")
        + ", serve ready "
        f"{t['serve_ready_s']:.1f}s, in-process {t['inprocess_s']:.1f}s, total {t['total_s']:.1f}s"
    )
    load = gen.get("load_average") or {}
    if load.get("before") and load.get("after"):
        print(
            f"1-minute load average: {load['before'][0]:.2f} before the section, "
            f"{load['after'][0]:.2f} at its end ({os.cpu_count()} CPUs; its own processes count)"
        )
