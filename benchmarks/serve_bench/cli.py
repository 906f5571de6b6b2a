"""``python benchmarks/serve_throughput.py``: runs the halves asked for, prints their tables,
writes benchmarks/results/serve_throughput[-smoke].{json,png}."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .baselines import run_baseline_server
from .classifier import run_classifier
from .common import NUM_CPUS, RESULTS, serve_throughput_mode
from .generator import measure_generation
from .report import make_chart, print_generator_table, print_table
from .workload import GEN_MAX_TOKENS, GEN_MODELS, generator_key


def main(description: str | None = None) -> None:
    """The command line (``description``: the first line of its ``--help``)."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="few requests per point; seconds")
    parser.add_argument("--bundle", type=Path, help="a trained classification bundle")
    parser.add_argument("--requests", type=int, help="classifier requests per point (600)")
    parser.add_argument("--time-limit", type=float, help="classifier seconds per point (30)")
    parser.add_argument(
        "--only",
        choices=("classifier", "generator"),
        help="run one section; the other's figures are kept from the existing results file",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=GEN_MAX_TOKENS, help="generator: tokens per request"
    )
    parser.add_argument(
        "--gen-models",
        default=None,
        help=f"generator: comma-separated model sizes of {', '.join(GEN_MODELS)} "
        "(default: all; with --smoke, toy)",
    )
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline_server(str(args.bundle), args.port, args.threads)
        return
    sizes = (args.gen_models or ("toy" if args.smoke else ",".join(GEN_MODELS))).split(",")
    unknown = [s for s in sizes if s not in GEN_MODELS]
    if unknown:
        parser.error(f"unknown --gen-models {unknown}; choose from {', '.join(GEN_MODELS)}")
    suffix = "-smoke" if args.smoke else ""
    json_path = RESULTS / f"serve_throughput{suffix}.json"
    report: dict[str, Any] = {}
    if args.only and json_path.is_file():
        report = json.loads(json_path.read_text())  # the section not run keeps its figures
    try:
        if args.only != "generator":
            print("classifier (MiniLM sentiment):", flush=True)
            report.update(run_classifier(args))
            print_table(report)
        if args.only != "classifier":
            for size in sizes:
                print(f"generator ({size} llama, {args.max_tokens} tokens per request, streamed):")
                gen = measure_generation(args.smoke, args.max_tokens, size)
                report[generator_key(size)] = gen
                print_generator_table(gen)
    finally:
        import ray

        ray.shutdown()
    if args.only:
        other = "generator" if args.only == "classifier" else "classifier"
        present = "generator" in report if other == "generator" else "results" in report
        report["kept_from_earlier_run"] = [other] if present else []
    report["machine"] = {"cpus": os.cpu_count(), "ray_num_cpus": NUM_CPUS}
    # Ray's documented high-throughput mode is an environment switch read when Serve starts.
    report["ray_serve_throughput_optimized"] = serve_throughput_mode()
    report["smoke"] = args.smoke
    RESULTS.mkdir(exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    make_chart(report, RESULTS / f"serve_throughput{suffix}.png")
