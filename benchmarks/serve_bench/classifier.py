"""The classifier half: taskray's batched Serve deployment vs the same without batching vs a
FastAPI + ``transformers`` pipeline server, MiniLM sentiment, one review per request.

The model: with ``--bundle PATH`` a trained bundle (``taskray quickstart --output
runs/quickstart`` writes ``runs/quickstart/bundle``). By default, smoke or not, the script writes
a bundle to a temporary directory without training: the pretrained all-MiniLM-L6-v2 encoder with
a randomly initialised two-label head. Throughput and latency depend on the architecture and the
input lengths, not on the weights, so the figures hold for a trained bundle; the predicted labels
are meaningless.

The three systems, all on CPU, all answering one review per request:

- ``serve_batched``: the app in ``serve/app.py`` deployed from ``configs/serve.yaml`` the way
  ``taskray serve`` does it (``cluster.serving``), with that file's ``max_batch_size`` and
  ``batch_wait_timeout_s``; API key auth on, as in production.
- ``serve_unbatched``: the same app and deployment class with ``max_batch_size: 1``. Both are
  models of one application: one ingress replica, one replica of each model.
- ``fastapi_pipeline``: what a user would otherwise write: ``pipeline("text-classification")``
  behind a FastAPI ``def`` route (FastAPI runs it in its thread pool), one uvicorn worker, in a
  subprocess, with the same torch thread count as the Serve replica (``TORCH_THREADS``: what
  ``TaskHead`` sets, ``serve.config.replica_threads`` of the model's ``num_cpus``).

All three run at once (the idle ones wait) and are measured in turn at each concurrency, so that
drifting load from other work on a shared machine hits all of them alike; the baseline therefore
also shares the cores with an idle Ray cluster.

The load generator is an asyncio ``httpx.AsyncClient`` in this process: ``concurrency`` clients
each send a request as soon as their previous one is answered (closed loop), after a warm-up,
until a request count or a time limit is reached. It shares the machine's cores with the
servers, equally for all three. Every response must be HTTP 200 with a label; anything else is
counted and reported as an error, and latency percentiles are over successful requests.

Where the time goes: every cell also records the CPU time each process spent per answered
request (``cpu_ms_per_request``: the Serve proxy, the ingress, the model replica, the baseline
server, the load generator; read from ``/proc``, so Linux only), and before any server starts
the script times ``predict_rows`` in-process on one text and on a full batch with the replica's
thread count (``compute``): the model's own CPU cost per request with and without batching.
On a CPU-bound machine batching can only save the difference between those two, so
``compute.batching_ceiling`` (their ratio) bounds what batched/unbatched can reach even with
zero serving overhead.

Targets (reported, not asserted): batched ≥ 3× unbatched at concurrency 32; batched ≥ 1.0× the
FastAPI baseline at concurrency 32 with a p99 no worse than its.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve.config import replica_threads

from .baselines import baseline_server
from .common import (
    API_KEY,
    NUM_CPUS,
    ROOT,
    deploy_and_wait,
    ensure_ray,
    free_port,
    keyed_config,
    ratio,
)
from .load import Cell, Target, has_label, measure
from .workload import CONCURRENCY, REVIEWS, SYSTEMS, warmup_requests

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def served_model() -> Any:
    """The benchmarked model's spec (the first model of configs/serve.yaml, defaults filled)."""
    import yaml

    from serve.config import ServedModel

    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    return ServedModel.model_validate(cfg["applications"][0]["args"]["models"][0])


# What TaskHead.__init__ gives the replica (replica_threads of the model's num_cpus); the
# baseline server uses the same.
TORCH_THREADS = replica_threads(served_model().num_cpus)


def build_untrained_bundle(directory: Path) -> Path:
    """A classification bundle from the pretrained MiniLM encoder with a random 2-label head
    (no training: throughput does not depend on the weights)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from actors.bundle import write_manifest
    from actors.config import ModelOptions
    from actors.modeling import build_model, resolve_model_path
    from tasks import get_task

    transformers.logging.set_verbosity_error()  # "newly initialised classifier weights"
    transformers.logging.disable_progress_bar()
    task = get_task("classification", max_length=128, labels=["Negative", "Positive"])
    torch.manual_seed(0)
    built = build_model(ModelOptions(name_or_path=MINILM), task.model_kind, task.labels)
    directory.mkdir(parents=True, exist_ok=True)
    built.model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(directory)
    write_manifest(directory, task, MINILM, extra={"note": "untrained head (benchmark only)"})
    return directory


def compute_reference(bundle: Path, threads: int, batch: int, repeats: int = 5) -> dict[str, Any]:
    """The model's own CPU cost per request, in-process (no HTTP, no Serve): ``predict_rows``
    on one review at a time and on ``batch`` reviews at once, with ``threads`` torch threads."""
    import torch

    from actors.bundle import load_bundle
    from actors.inference import predict_rows

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded = load_bundle(str(bundle), device="cpu")
        rows = [{"text": REVIEWS[i % len(REVIEWS)]} for i in range(batch)]

        def cpu_ms_per_row(size: int) -> float:
            chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
            predict_rows(loaded, chunks[0])  # warm-up
            c0 = time.process_time()
            for _ in range(repeats):
                for chunk in chunks:
                    predict_rows(loaded, chunk)
            return (time.process_time() - c0) * 1000.0 / (repeats * len(rows))

        one, full = cpu_ms_per_row(1), cpu_ms_per_row(batch)
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "batch": batch,
        "cpu_ms_per_row_alone": one,
        "cpu_ms_per_row_batched": full,
        "batching_ceiling": one / full if full else None,
    }


def write_serve_config(tmp: Path, bundle: Path, port: int) -> tuple[Path, dict[str, Any]]:
    """``configs/serve.yaml`` with this bundle, an API key file, a free loopback port, and a
    second model: the same deployment with ``max_batch_size: 1``."""
    import yaml

    cfg, app = keyed_config(ROOT / "configs" / "serve.yaml", tmp, port)
    args = app["args"]
    batched = args["models"][0]
    batched.update(bundle=str(bundle), device="cpu")
    unbatched = {**copy.deepcopy(batched), "name": f"{batched['name']}-nobatch"}
    unbatched["max_batch_size"] = 1
    args["models"] = [batched, unbatched]
    deployments = app.get("deployments") or []
    for entry in list(deployments):
        if entry["name"].endswith(f"-{batched['name']}"):  # e.g. classification-sentiment
            deployments.append({**entry, "name": f"{entry['name']}-nobatch"})
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, {"batched": batched, "unbatched": unbatched}


def batch_sizes(deployment: str, app_name: str) -> Counter[int] | None:
    """The replica's batch-size histogram (``TaskHead.stats``), or None if it has none."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle(deployment, app_name=app_name)
        stats = handle.stats.remote().result(timeout_s=30)
        return Counter({int(k): int(v) for k, v in stats["batch_sizes"].items()})
    except Exception:  # a rewritten TaskHead may not expose stats: then there is nothing to say
        return None


@contextmanager
def serve_app(bundle: Path, tmp: Path, info: dict[str, Any]) -> Iterator[dict[str, Target]]:
    """Start Ray (``ensure_ray``), deploy the app as ``taskray serve`` does, wait for
    ``/readyz``, yield the batched and unbatched targets; shut Serve down however the block
    ends. Fills ``info`` with start-up timings and the served model specs."""
    from ray import serve

    info["ray_start_s"] = ensure_ray()
    try:
        path, models = write_serve_config(tmp, bundle, free_port())
        config, url = deploy_and_wait(path, info)
        info["models"] = models
        info["app_name"] = config.applications[0].name
        info["batched_deployment"] = f"{models['batched']['task']}-{models['batched']['name']}"
        headers = {"Authorization": f"Bearer {API_KEY}"}
        endpoint = f"{url}/v1/tasks/classification"

        def check(body: Any) -> bool:
            return has_label((body.get("predictions") or [None])[0])

        yield {
            system: Target(
                system,
                endpoint,
                lambda text, m=models[kind]["name"]: {"text": text, "model": m},
                check,
                headers,
            )
            for system, kind in (("serve_batched", "batched"), ("serve_unbatched", "unbatched"))
        }
    finally:
        serve.shutdown()  # Ray itself stays up for the next section; main() shuts it down


def run_classifier(args: argparse.Namespace) -> dict[str, Any]:
    """The classifier half: the three systems at each concurrency (see the module docstring)."""
    sizes = {
        "n_requests": args.requests or (48 if args.smoke else 600),
        "time_limit_s": args.time_limit or (4.0 if args.smoke else 30.0),
    }
    started = time.perf_counter()
    cells: dict[str, dict[int, Cell]] = {s: {} for s in SYSTEMS}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        if args.bundle:
            bundle, bundle_source = args.bundle.resolve(), "given (--bundle)"
        else:
            bundle = build_untrained_bundle(tmp / "bundle")
            bundle_source = f"untrained: pretrained {MINILM} encoder + random 2-label head"
        timings["bundle_s"] = time.perf_counter() - t0
        print(f"bundle: {bundle} ({bundle_source})", flush=True)
        # Before any server starts, so that nothing else competes for the cores.
        compute = compute_reference(
            bundle, TORCH_THREADS, served_model().max_batch_size, repeats=1 if args.smoke else 5
        )
        print(
            f"in-process predict_rows CPU per review ({TORCH_THREADS} threads): "
            f"{compute['cpu_ms_per_row_alone']:.1f} ms alone, "
            f"{compute['cpu_ms_per_row_batched']:.1f} ms in a batch of {compute['batch']}",
            flush=True,
        )

        serve_info: dict[str, Any] = {"mean_batch_size": {}}
        t0 = time.perf_counter()
        with baseline_server(bundle, tmp / "baseline.log", TORCH_THREADS) as baseline:
            timings["baseline_ready_s"] = time.perf_counter() - t0
            with serve_app(bundle, tmp, serve_info) as serve_targets:
                targets = {**serve_targets, "fastapi_pipeline": baseline}
                app, head = serve_info["app_name"], serve_info["batched_deployment"]
                # Interleaved, so that load from other work on a shared machine hits all three.
                for c in CONCURRENCY:
                    for system in SYSTEMS:
                        before = batch_sizes(head, app) if system == "serve_batched" else None
                        cells[system][c] = measure(
                            targets[system], c, warmup=warmup_requests(c), **sizes
                        )
                        after = batch_sizes(head, app) if before is not None else None
                        if before is not None and after is not None:
                            # Counts the warm-up too, which runs at the same concurrency.
                            new = after - before
                            if new:
                                mean = sum(k * v for k, v in new.items()) / sum(new.values())
                                serve_info["mean_batch_size"][c] = mean
        timings.update({k: serve_info.pop(k) for k in ("ray_start_s", "serve_ready_s")})
    timings["total_s"] = time.perf_counter() - started
    results = {s: {c: cells[s][c].summary() for c in CONCURRENCY} for s in SYSTEMS}
    top = max(CONCURRENCY)
    batched, unbatched, base = (results[s][top] for s in SYSTEMS)
    vs_unbatched = ratio(batched["requests_per_s"], unbatched["requests_per_s"])
    vs_fastapi = ratio(batched["requests_per_s"], base["requests_per_s"])
    p99_vs_fastapi = ratio(batched["p99_ms"], base["p99_ms"])
    ratios = {
        f"batched_vs_unbatched_rps_c{top}": vs_unbatched,
        f"batched_vs_fastapi_rps_c{top}": vs_fastapi,
        f"batched_vs_fastapi_p99_c{top}": p99_vs_fastapi,
    }
    targets = {
        f"batched ≥ 3× unbatched req/s at c={top}": vs_unbatched is not None
        and vs_unbatched >= 3.0,
        f"batched ≥ 1.0× fastapi req/s at c={top}": vs_fastapi is not None and vs_fastapi >= 1.0,
        f"batched p99 ≤ fastapi p99 at c={top}": p99_vs_fastapi is not None
        and p99_vs_fastapi <= 1.0,
    }
    return {
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": NUM_CPUS},
        "torch_threads": TORCH_THREADS,
        "compute": compute,
        "bundle": {"path": str(bundle) if args.bundle else None, "source": bundle_source},
        "serve": serve_info,
        "load": {
            **sizes,
            "warmup": {c: warmup_requests(c) for c in CONCURRENCY},
            "reviews": len(REVIEWS),
        },
        "results": results,
        "ratios": ratios,
        "targets_met": targets,
        "timings_s": timings,
        "smoke": args.smoke,
    }
