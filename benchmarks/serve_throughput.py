"""Serving throughput on this machine: taskray's batched Ray Serve deployment vs the same
deployment without batching vs a plain FastAPI + uvicorn server around a `transformers`
pipeline, for the MiniLM sentiment classifier: requests/s and p50/p99 latency at a closed-loop
concurrency of 1, 8 and 32 over HTTP on loopback.

    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py          # a few minutes
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --smoke  # what CI runs
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --bundle PATH  # trained

(Only one Ray cluster may run on the machine at a time, hence the shared lock.)

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

Prints a table and writes benchmarks/results/serve_throughput[-smoke].{json,png}. Every ratio is
between figures measured in this invocation. Targets (reported, not asserted): batched ≥ 3×
unbatched at concurrency 32; batched ≥ 1.0× the FastAPI baseline at concurrency 32 with a p99
no worse than its.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.config import replica_threads  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CONCURRENCY = (1, 8, 32)
SYSTEMS = ("serve_batched", "serve_unbatched", "fastapi_pipeline")
NUM_CPUS = 2
API_KEY = "serve-throughput-benchmark-key"


def served_model() -> Any:
    """The benchmarked model's spec (the first model of configs/serve.yaml, defaults filled)."""
    import yaml

    from serve.config import ServedModel

    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    return ServedModel.model_validate(cfg["applications"][0]["args"]["models"][0])


# What TaskHead.__init__ gives the replica (replica_threads of the model's num_cpus); the
# baseline server uses the same.
TORCH_THREADS = replica_threads(served_model().num_cpus)

REVIEWS = [
    "Arrived two days early and works exactly as described.",
    "The battery dies before lunch. Returning it.",
    "Honestly the best pizza I've had outside Naples.",
    "Customer service hung up on me twice. Never again.",
    "Comfortable shoes, but they squeak on wooden floors.",
    "The plot dragged in the middle, yet the ending made up for it.",
    "Cheap plastic, snapped the first time I used it.",
    "Great value for the price; my kids love it.",
    "The hotel room smelled of smoke and the sheets were stained.",
    "Setup took five minutes and the app is genuinely intuitive.",
    "Not worth the hype. Bland and overpriced.",
    "Our waiter was attentive without hovering. Lovely evening.",
    "The headphones sound fine but hurt my ears after an hour.",
    "I've reread this book three times and still find new things in it.",
    "Package was soaked and the box was crushed.",
    "Fast shipping, well packaged, exactly what I ordered.",
    "The sequel is a cynical cash grab with none of the original's charm.",
    "Quiet, powerful, and easy to clean. Five stars.",
    "It stopped charging after a week and support never replied.",
    "A cosy little cafe with excellent coffee and friendly staff.",
    "Instructions were missing and two screws didn't fit.",
    "The update fixed every bug I complained about. Impressed.",
    "Flimsy zipper, faded after one wash.",
    "Surprisingly good for a budget phone; the camera is decent in daylight.",
    "Waited forty minutes for cold food.",
    "Perfect fit and the fabric feels premium.",
    "The film looks gorgeous but the dialogue is painfully wooden.",
    "My go-to blender for smoothies; crushes ice with no trouble.",
    "Misleading photos. The real thing is half the size.",
    "Friendly host, spotless apartment, great location near the station.",
]


class ClassifyBody(BaseModel):
    """The baseline server's request body."""

    text: str


# ----- CPU accounting ---------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_snapshot(extra: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds so far of the processes that serve requests, by role: the Serve proxy,
    each Serve replica (``ServeReplica:<app>:<deployment>`` → the deployment's name), Ray's own
    daemons, plus ``extra`` (pid → label) and this process (the load generator). Empty where
    ``/proc`` does not exist."""
    if not Path("/proc/self/stat").exists():
        return {}
    labels: dict[int, str] = {os.getpid(): "load_generator", **(extra or {})}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in labels:
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith("ray::ServeReplica:"):
            labels[int(entry.name)] = argv0.rsplit(":", 1)[-1]
        elif argv0.startswith("ray::ProxyActor"):
            labels[int(entry.name)] = "serve_proxy"
        elif argv0.startswith("ray::ServeController"):
            labels[int(entry.name)] = "serve_controller"
        elif argv0.endswith(("/gcs_server", "/raylet")):
            labels[int(entry.name)] = "ray_daemons"
    out: dict[str, float] = {}
    for pid, label in labels.items():
        seconds = process_cpu_s(pid)
        if seconds is not None:
            out[label] = out.get(label, 0.0) + seconds
    return out


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


# ----- load generator ---------------------------------------------------------------------------
@dataclass
class Cell:
    """One system at one concurrency: what came back and how fast."""

    system: str
    concurrency: int
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Requests/s of successful requests and latency percentiles in milliseconds."""
        lat = np.array(self.latencies_s) * 1000.0
        ok = len(lat)
        return {
            "concurrency": self.concurrency,
            "ok": ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "error_samples": self.error_samples,
            "seconds": self.seconds,
            "requests_per_s": ok / self.seconds if self.seconds > 0 else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if ok else None,
            "p99_ms": float(np.percentile(lat, 99)) if ok else None,
            "mean_ms": float(lat.mean()) if ok else None,
            "cpu_ms_per_request": {
                k: v * 1000.0 / ok for k, v in sorted(self.cpu_s.items()) if ok and v > 0
            },
        }


@dataclass
class Target:
    """An HTTP endpoint of one system and how to ask it to classify a text."""

    name: str
    url: str
    body: Callable[[str], dict[str, Any]]
    check: Callable[[Any], bool]
    headers: dict[str, str] = field(default_factory=dict)
    pids: dict[int, str] = field(default_factory=dict)  # server processes outside Ray, by label


async def _closed_loop(
    client: httpx.AsyncClient,
    target: Target,
    cell: Cell,
    n_requests: int,
    time_limit_s: float,
    offset: int = 0,
) -> None:
    """``cell.concurrency`` clients, each sending its next request when the last is answered,
    until ``n_requests`` have been sent or ``time_limit_s`` has passed (in-flight ones finish)."""
    issued = 0
    deadline = time.perf_counter() + time_limit_s

    async def one_client() -> None:
        nonlocal issued
        while issued < n_requests and time.perf_counter() < deadline:
            text = REVIEWS[(offset + issued) % len(REVIEWS)]
            issued += 1
            start = time.perf_counter()
            try:
                response = await client.post(target.url, json=target.body(text))
                if response.status_code != 200:
                    kind, detail = f"HTTP {response.status_code}", response.text
                elif not target.check(response.json()):
                    kind, detail = "bad body", response.text
                else:
                    cell.latencies_s.append(time.perf_counter() - start)
                    continue
            except (httpx.HTTPError, ValueError) as err:
                kind, detail = type(err).__name__, str(err)
            cell.errors[kind] += 1
            cell.error_samples.setdefault(kind, detail[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(cell.concurrency)))
    cell.seconds = time.perf_counter() - t0


async def _measure(
    target: Target, concurrency: int, n_requests: int, time_limit_s: float, warmup: int
) -> Cell:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0, headers=target.headers) as client:
        # The warm-up opens the connections and lets the server reach its steady state.
        await _closed_loop(client, target, Cell(target.name, concurrency), warmup, time_limit_s)
        cell = Cell(target.name, concurrency)
        before = cpu_snapshot(target.pids)
        await _closed_loop(client, target, cell, n_requests, time_limit_s, offset=warmup)
        after = cpu_snapshot(target.pids)
        cell.cpu_s = {k: v - before[k] for k, v in after.items() if k in before}
    return cell


def measure(
    target: Target, concurrency: int, n_requests: int, time_limit_s: float, warmup: int
) -> Cell:
    """Closed-loop load against ``target`` at ``concurrency`` (after ``warmup`` requests)."""
    cell = asyncio.run(_measure(target, concurrency, n_requests, time_limit_s, warmup))
    s = cell.summary()
    errors = f", {s['errors']} errors {s['error_kinds']}" if s["errors"] else ""
    print(
        f"  {target.name:<17} c={concurrency:<3} {s['requests_per_s']:>7.1f} req/s "
        f"({s['ok']} in {s['seconds']:.1f}s){errors}",
        flush=True,
    )
    return cell


# ----- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def warmup_requests(concurrency: int) -> int:
    """Requests sent (and discarded) before measuring at this concurrency."""
    return max(8, 2 * concurrency)


def has_label(pred: Any) -> bool:
    """A prediction object with a string label."""
    return isinstance(pred, dict) and isinstance(pred.get("label"), str)


# ----- (c) the baseline: FastAPI + uvicorn around a transformers pipeline ----------------------
def run_baseline_server(bundle: str, port: int, threads: int) -> None:
    """The server a user would write by hand (runs in the subprocess, blocks until killed)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    torch.set_num_threads(threads)
    classifier = pipeline("text-classification", model=bundle, device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/classify")
    def classify(body: ClassifyBody) -> dict[str, Any]:
        return classifier(body.text)[0]

    uvicorn.run(app, host="127.0.0.1", port=port, workers=1)


@contextmanager
def baseline_server(bundle: Path, log_path: Path, timeout_s: float = 180.0) -> Iterator[Target]:
    """Run the baseline server in a subprocess, poll ``/health`` until it answers, yield its
    target; terminate it however the block ends."""
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server"]
    cmd += ["--bundle", str(bundle), "--port", str(port), "--threads", str(TORCH_THREADS)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                tail = " | ".join(log_path.read_text().strip().splitlines()[-5:])
                raise RuntimeError(f"baseline server exited ({proc.returncode}): {tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f}s")
            time.sleep(0.2)  # poll interval, not a readiness guess
        yield Target(
            "fastapi_pipeline",
            f"{url}/classify",
            lambda text: {"text": text},
            has_label,
            pids={proc.pid: "fastapi_server"},
        )
    finally:
        stop_process(proc)


def stop_process(proc: Any) -> None:
    """Terminate a subprocess, killing it if it does not exit promptly."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----- (a), (b) taskray's Serve app -------------------------------------------------------------
def write_serve_config(tmp: Path, bundle: Path, port: int) -> tuple[Path, dict[str, Any]]:
    """``configs/serve.yaml`` with this bundle, an API key file, a free loopback port, and a
    second model: the same deployment with ``max_batch_size: 1``."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    args = app["args"]
    args.update(api_key_file=str(key_file), api_key_env=None)
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
    """Start Ray, deploy the app as ``taskray serve`` does, wait for ``/readyz``, yield the
    batched and unbatched targets; shut Serve and Ray down however the block ends. Fills
    ``info`` with start-up timings and the served model specs."""
    import ray
    from ray import serve

    from cluster import serving

    t0 = time.perf_counter()
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        info["ray_start_s"] = time.perf_counter() - t0
        path, models = write_serve_config(tmp, bundle, free_port())
        config = serving.load_serve_config(str(path))
        url = serving.base_url(config)
        t1 = time.perf_counter()
        serving.deploy(config)
        serving.wait_ready(url, timeout_s=300, progress=lambda *_: None)
        info["serve_ready_s"] = time.perf_counter() - t1
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
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ----- generator streaming (extension point) ----------------------------------------------------
# When serve/ has a generator deployment, this is where its benchmark goes: a function
# `measure_generation(...) -> dict` reporting streamed tokens/s and time to first token through
# the Serve app against `model.generate` in-process, called from `main()` at the marked place,
# its figures stored under report["generation"], printed and charted like the classification
# figures. Nothing is measured for generation yet, so nothing is printed or written for it.


# ----- report -----------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def make_chart(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """Throughput and p99 latency vs concurrency, one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")
        return
    colours = {"serve_batched": "#2a7", "serve_unbatched": "#77a", "fastapi_pipeline": "#999"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for system, by_c in results.items():
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
    fig.suptitle(f"MiniLM sentiment over HTTP ({NUM_CPUS} CPUs, {TORCH_THREADS} torch threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="few requests per point; seconds")
    parser.add_argument("--bundle", type=Path, help="a trained classification bundle")
    parser.add_argument("--requests", type=int, help="requests per point (default 600)")
    parser.add_argument("--time-limit", type=float, help="seconds per point (default 30)")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline_server(str(args.bundle), args.port, args.threads)
        return
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
        with baseline_server(bundle, tmp / "baseline.log") as baseline:
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
        # Extension point: report["generation"] = measure_generation(...) goes here, once
        # serve/ has a generator deployment (see the section above).
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
    report = {
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
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    (RESULTS / f"serve_throughput{suffix}.json").write_text(json.dumps(report, indent=2))
    make_chart(results, RESULTS / f"serve_throughput{suffix}.png")


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


if __name__ == "__main__":
    main()
