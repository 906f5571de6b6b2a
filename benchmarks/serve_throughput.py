"""Serving throughput on this machine, in two sections. Classifier: taskray's batched Ray Serve
deployment vs the same deployment without batching vs a plain FastAPI + uvicorn server around a
`transformers` pipeline, for the MiniLM sentiment classifier: requests/s and p50/p99 latency at
a closed-loop concurrency of 1, 8 and 32 over HTTP on loopback. Generator: a tiny causal LM
streamed over server-sent events from ``/v1/completions`` (continuous batching) vs
``model.generate`` in-process: time to first token and tokens/s at a concurrency of 1, 4, 8 and
16, and a mixed load (streamed and not, two LoRA adapters, two lengths) at 16.

    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py          # a few minutes
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --smoke  # what CI runs
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --bundle PATH  # trained
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --only generator

(Only one Ray cluster may run on the machine at a time, hence the shared lock. ``--only
classifier|generator`` runs one section and keeps the other's figures from the existing
results file, marking them under ``kept_from_earlier_run``.)

Classifier
----------

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

Generator
---------
The model: ``tiny:llama`` (``actors.tiny``: 2 layers, hidden size 64, a 600-token byte-level
BPE) with random weights (seed 0), saved with its tokenizer as a plain HF model directory in a
temporary directory, and two LoRA adapters over it (r=4 on q/v, random non-zero weights, so
each changes the text). For these prompts the random weights rarely emit EOS, so most requests
generate their full ``max_tokens`` (the JSON's finish reasons show it; nothing relies on it).
A token costs the model about 1-2 ms on one thread, so the figures magnify the per-token cost
of serving; a real model spends far more per token in the forward pass and the relative
overhead shrinks accordingly.

- Serve: the ``writer`` generator of ``configs/serve-llm.yaml`` (its ``num_cpus``,
  ``scheduler`` and generation defaults; the other models, retrieval and autoscaling left out,
  one replica) with the two adapters, deployed the way ``taskray serve`` does
  (``cluster.serving``), API key auth on, after the classifier section's Serve instance has
  stopped. Every request joins the replica's running batch (``actors.engine``). A streamed
  request is ``POST /v1/completions`` with ``stream: true``, ``temperature: 0`` and
  ``max_tokens``; the client reads the SSE lines as they arrive. TTFT = from sending the
  request to the first ``data:`` chunk with non-empty text. Decode tokens/s per request =
  tokens generated between the first and the last non-empty chunk ÷ the time between them;
  aggregate tokens/s = all tokens ÷ the wall time of the closed loop (``c`` clients, each
  sending its next request when the previous one is answered).
- Mixed load (16 clients): every prompt through the base and each adapter, alternately
  streamed and not, at ``max_tokens`` and at half of it. TTFT and decode rates are over its
  streamed requests, the aggregate over all. Each text is checked against the in-process
  greedy reference of its prompt, adapter and length.
- In-process: the same weights (and adapters, through PEFT) loaded in this process with the
  replica's torch thread count (``serve.config.replica_threads`` of the model's ``num_cpus``):
  ``generate`` feeding a ``TextIteratorStreamer`` in a thread, one prompt at a time (TTFT =
  from tokenising to the first non-empty text piece; decode rate as above), plain
  ``generate`` one prompt at a time, and ``batch{c}``: ``c`` prompts in one left-padded
  ``generate`` for each concurrency ``c`` > 1 — static batching's aggregate, the baseline of
  the Serve figure at the same ``c``; and ``engine{c}``: taskray's continuous-batching engine
  itself in this process with ``c`` closed-loop clients and no Serve (the scheduler's own
  figure: what Serve's transport costs is the gap between it and Serve). Measured while the
  Serve app is up and idle, a few
  passes before each Serve cell and pooled, so that both share the cores with an idle Ray
  cluster, and with drifting load from other work, alike.

Token counts are not taken from the stream (its chunks carry text, not token counts): decoding
is greedy, so every text must equal the in-process reference's text for its job, whose token
count (and the number of tokens generated when the first and the last non-empty piece
appeared, recorded by a counting streamer) is then exact; a text that differs is counted as a
mismatch and its tokens re-counted by re-tokenising it. Before measuring, one non-streamed
request per prompt checks the text and ``usage.completion_tokens`` against the reference
(``usage_check``). CPU time per token by process is recorded as for the classifier.

Ratios: Serve aggregate at ``c`` ÷ in-process ``batch{c}`` (target ≥ 0.7 at 4, 8 and 16),
``engine{c}`` ÷ ``batch{c}``,
TTFT p50 at 16 ÷ at 1 (target ≤ 4), the mixed load ÷ the plain streamed load at 16 (target
within 20%), Serve decode tokens/s ÷ in-process streamed (per-request p50), and the TTFT
overhead (Serve − in-process alone, p50 and p99; under load it includes queueing).

Prints tables and writes benchmarks/results/serve_throughput[-smoke].{json,png} (the generator's
figures under ``"generator"``, its chart in the bottom row). Every ratio is between figures
measured in this invocation.
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


def _deployment_names() -> list[str]:
    """The running Serve deployments' names, longest first (empty when Ray is not up)."""
    try:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return []
        apps = serve.status().applications.values()
        return sorted({d for app in apps for d in app.deployments}, key=len, reverse=True)
    except Exception:  # accounting only: never fail a measurement over a label
        return []


def _deployment_label(tail: str, deployments: list[str]) -> str:
    """A replica's deployment name from the end of its process title: Ray appends the method
    it runs (or last ran), e.g. ``generator-writer.handle_request_with_rejection``, and a
    label that changes between two snapshots would drop that process from the accounting."""
    for name in deployments:
        if tail == name or tail.startswith(name + "."):
            return name
    return tail


def cpu_snapshot(extra: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds so far of the processes that serve requests, by role: the Serve proxy,
    each Serve replica (``ServeReplica:<app>:<deployment>`` → the deployment's name), Ray's own
    daemons, plus ``extra`` (pid → label) and this process (the load generator). Empty where
    ``/proc`` does not exist."""
    if not Path("/proc/self/stat").exists():
        return {}
    labels: dict[int, str] = {os.getpid(): "load_generator", **(extra or {})}
    deployments = _deployment_names()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in labels:
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith("ray::ServeReplica:"):
            labels[int(entry.name)] = _deployment_label(argv0.rsplit(":", 1)[-1], deployments)
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


def ensure_ray() -> float:
    """Start this process's Ray cluster unless it runs already (the two sections share one,
    each with Serve started and shut down anew); the seconds it took, 0.0 if it ran."""
    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t0


def deploy_and_wait(path: Path, info: dict[str, Any]) -> tuple[Any, str]:
    """Deploy a Serve config file as ``taskray serve`` does and wait for ``/readyz``; records
    ``info["serve_ready_s"]``. Returns the loaded config and the base URL."""
    from cluster import serving

    config = serving.load_serve_config(str(path))
    url = serving.base_url(config)
    t1 = time.perf_counter()
    serving.deploy(config)
    serving.wait_ready(url, timeout_s=300, progress=lambda *_: None)
    info["serve_ready_s"] = time.perf_counter() - t1
    return config, url


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


# ----- the generator: streamed tokens over SSE vs model.generate in-process ---------------------
GEN_CONCURRENCY = (1, 4, 8, 16)
MIXED_CONCURRENCY = 16  # the mixed load (streamed and not, two adapters, two lengths)
ADAPTERS = {"style-a": 1, "style-b": 2}  # LoRA adapters over the generator (name: seed)
GEN_MAX_TOKENS = 64
GEN_CONFIG = ROOT / "configs" / "serve-llm.yaml"
PROMPTS = [
    "Write a short note about the train timetable.",
    "Summarize the following article in one sentence.",
    "Question: what is 12 times 7? Answer:",
    "You are a helpful assistant. Please answer briefly and politely.",
    "Translate English to German: The weather is nice today.",
    "Paris is the capital of France; Berlin is",
    "The quick brown fox",
    "def add(a, b):",
]


def generator_model() -> dict[str, Any]:
    """The generator entry of configs/serve-llm.yaml (``writer``) as written there."""
    import yaml

    cfg = yaml.safe_load(GEN_CONFIG.read_text())
    models = cfg["applications"][0]["args"]["models"]
    return copy.deepcopy(next(m for m in models if m["name"] == "writer"))


def _gen_threads() -> int:
    from serve.config import ServedModel

    spec = ServedModel.model_validate({**generator_model(), "bundle": "unused"})
    return replica_threads(spec.num_cpus)


# What GeneratorBase.__init__ gives the replica; the in-process reference uses the same.
GEN_THREADS = _gen_threads()


def build_tiny_lm(directory: Path) -> Path:
    """A plain HF model directory (no taskray manifest): ``tiny:llama``'s config and tokenizer
    with random weights (seed 0), saved as safetensors. ``tiny_model_path`` holds no weights."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.tiny import tiny_model_path

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def build_adapters(model_dir: Path, tmp: Path) -> dict[str, str]:
    """Random (non-zero) LoRA adapters over the tiny model, so each changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for name, seed in ADAPTERS.items():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False)  # fmt: skip
        get_peft_model(model, config).save_pretrained(tmp / name)
        paths[name] = str(tmp / name)
    return paths


def mixed_jobs(max_tokens: int) -> list[dict[str, Any]]:
    """The mixed load, cycled by its clients: every prompt through the base model and each
    adapter, half streamed and half not, at the full and at half the token budget."""
    models = ["writer", *ADAPTERS]
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for j, model in enumerate(models):
            k = i * len(models) + j
            tokens = max_tokens if k % 4 < 2 else max_tokens // 2
            jobs.append({"prompt": prompt, "model": model, "max_tokens": tokens,
                         "stream": k % 2 == 0})  # fmt: skip
    return jobs


def job_key(job: dict[str, Any]) -> tuple[str, str, int]:
    """What a job's greedy reference text depends on."""
    return job["prompt"], job["model"], job["max_tokens"]


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    """The q-th percentile of values times scale, or None when there are none."""
    return float(np.percentile(np.array(values) * scale, q)) if values else None


def stream_figures(
    ttft_s: list[float], decode_tok_s: list[float], e2e_tok_s: list[float]
) -> dict[str, Any]:
    """TTFT percentiles (ms) and per-request token rates of a set of streamed requests."""
    return {
        "ttft_p50_ms": pct(ttft_s, 50, 1000.0),
        "ttft_p99_ms": pct(ttft_s, 99, 1000.0),
        "ttft_mean_ms": float(np.mean(ttft_s) * 1000.0) if ttft_s else None,
        "decode_tok_s_p50": pct(decode_tok_s, 50),
        "decode_tok_s_mean": float(np.mean(decode_tok_s)) if decode_tok_s else None,
        "e2e_tok_s_p50": pct(e2e_tok_s, 50),
    }


def decode_rate(k_first: int, k_last: int, t_first: float, t_last: float) -> float | None:
    """Tokens generated between the first and the last text piece per second (None when the
    request streamed a single piece)."""
    return (
        (k_last - k_first) / (t_last - t_first) if t_last > t_first and k_last > k_first else None
    )


class InProcess:
    """The reference: the same weights in this process, greedy ``model.generate`` with
    ``threads`` torch threads and ``max_tokens`` new tokens.

    - streamed: one prompt at a time, ``generate`` in a thread feeding a
      ``TextIteratorStreamer``; TTFT = time from tokenising until the first non-empty text
      piece; the decode rate counts the tokens generated between the first and the last
      non-empty piece.
    - plain: one prompt at a time, ``generate`` without a streamer, tokens / wall time.
    - batch{n}: for each concurrency n > 1, n prompts (cycled) in one left-padded ``generate``:
      the aggregate tokens/s of static batching at that batch size, what Serve's continuous
      batching is measured against.

    ``run`` adds passes (called between the Serve cells, so that drifting load on a shared
    machine hits both alike); ``summary`` pools them. ``reference`` holds, per job key (prompt,
    model or adapter, max tokens), the continuation (text, tokens generated, tokens generated
    when the first and the last non-empty piece appeared) that the Serve figures are checked
    and counted against: decoding is greedy, so Serve must send exactly this text."""

    def __init__(self, model_dir: Path, adapters: dict[str, str], jobs: list[dict[str, Any]],
                 threads: int, max_tokens: int):  # fmt: skip
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.prompts, self.threads, self.max_tokens = PROMPTS, threads, max_tokens
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))

        def load() -> Any:
            return AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True)

        self.model = load().eval()
        self.models = {"writer": self.model}
        for name, path in adapters.items():
            self.models[name] = PeftModel.from_pretrained(load(), path).eval()
        self.eos = self.tok.eos_token_id
        self.streams: list[dict[str, Any]] = []
        self.plains: list[tuple[int, float]] = []
        self.widths = [c for c in GEN_CONCURRENCY if c > 1]
        self.batches: dict[int, list[tuple[int, float]]] = {w: [] for w in self.widths}
        self.engined: dict[int, list[tuple[int, float]]] = {w: [] for w in self.widths}
        self.engine_mismatches = 0
        self.reference: dict[tuple[str, str, int], dict[str, Any]] = {}
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self._streamed(PROMPTS[0]), self._plain(PROMPTS[:1])  # warm-up
            for prompt in PROMPTS:
                self.reference[(prompt, "writer", max_tokens)] = self._streamed(prompt)
            for job in jobs:
                if job_key(job) not in self.reference:
                    self.reference[job_key(job)] = self._streamed(
                        job["prompt"], self.models[job["model"]], job["max_tokens"]
                    )
        finally:
            torch.set_num_threads(previous)

    def _kwargs(self, max_tokens: int) -> dict[str, Any]:
        return {
            "max_new_tokens": max_tokens,
            "do_sample": False,
            "use_cache": True,
            "pad_token_id": self.tok.pad_token_id,
            "eos_token_id": self.eos,
        }

    def _new_ids(self, out: Any, prompt_len: int, row: int = 0) -> list[int]:
        ids = out[row, prompt_len:].tolist()
        return ids[: ids.index(self.eos) + 1] if self.eos in ids else ids

    def _streamed(self, prompt: str, model: Any = None, max_tokens: int | None = None) -> dict:
        import threading

        import torch
        from transformers import TextIteratorStreamer

        class CountingStreamer(TextIteratorStreamer):
            """Records how many new tokens existed when each text piece was emitted."""

            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.tokens, self.counts = 0, []

            def put(self, value: Any) -> None:
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    self.tokens += int(value.numel())
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                self.counts.append(self.tokens)  # before the consumer can see the piece
                super().on_finalized_text(text, stream_end)

        model = model if model is not None else self.model
        kwargs = self._kwargs(max_tokens or self.max_tokens)
        t0 = time.perf_counter()
        enc = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
        streamer = CountingStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        out: dict[str, Any] = {}

        def run() -> None:
            with torch.inference_mode():
                out["ids"] = model.generate(**enc, **kwargs, streamer=streamer)

        thread = threading.Thread(target=run)
        thread.start()
        pieces = [(time.perf_counter(), piece) for piece in streamer]
        t_end = time.perf_counter()
        thread.join()
        shown = [(t, i) for i, (t, piece) in enumerate(pieces) if piece]
        ids = self._new_ids(out["ids"], enc["input_ids"].shape[1])
        first, last = (shown[0], shown[-1]) if shown else ((t_end, 0), (t_end, 0))
        k_first, k_last = streamer.counts[first[1]], streamer.counts[last[1]]
        return {
            "text": "".join(p for _, p in pieces),
            "n_tokens": len(ids),
            "k_first": k_first,
            "k_last": k_last,
            "ttft_s": first[0] - t0,
            "decode_tok_s": decode_rate(k_first, k_last, first[0], last[0]),
            "e2e_tok_s": len(ids) / (t_end - t0),
        }

    def _plain(self, batch: list[str]) -> tuple[int, float]:
        import torch

        t0 = time.perf_counter()
        self.tok.padding_side = "left"
        enc = self.tok(batch, return_tensors="pt", add_special_tokens=False, padding=True)
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._kwargs(self.max_tokens))
        seconds = time.perf_counter() - t0
        width = enc["input_ids"].shape[1]
        return sum(len(self._new_ids(out, width, r)) for r in range(len(batch))), seconds

    def _engine_loop(self, width: int, n_requests: int) -> tuple[int, float]:
        """taskray's continuous-batching engine in this process, no Serve: ``width`` closed-loop
        clients (each submits its next prompt when its previous one is done) → tokens, s."""
        import threading

        from actors.engine import ContinuousBatchingEngine
        from actors.generation import SamplingParams

        engine = ContinuousBatchingEngine(self.model, self.tok)
        params = SamplingParams(max_new_tokens=self.max_tokens)
        lock, finished = threading.Lock(), threading.Event()
        state = {"issued": 0, "done": 0, "tokens": 0}

        def submit() -> None:
            prompt = self.prompts[state["issued"] % len(self.prompts)]
            state["issued"] += 1
            engine.submit(prompt, params, None, lambda k, p, q=prompt: on_event(k, p, q))

        def on_event(kind: str, payload: Any, prompt: str) -> None:
            if kind == "text":
                return
            with lock:
                state["done"] += 1
                if kind == "done":
                    state["tokens"] += payload.completion_tokens
                    ref = self.reference[(prompt, "writer", self.max_tokens)]["text"]
                    self.engine_mismatches += payload.text != ref
                if state["issued"] < n_requests:
                    submit()
                elif state["done"] == n_requests:
                    finished.set()

        t0 = time.perf_counter()
        with lock:
            for _ in range(width):
                submit()
        finished.wait(300)
        seconds = time.perf_counter() - t0
        engine.close()
        return state["tokens"], seconds

    def run(self, passes: int) -> None:
        """``passes`` times: each prompt streamed and plain, and one batch of each width (by
        ``generate`` and by the engine)."""
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for _ in range(passes):
                self.streams += [self._streamed(p) for p in self.prompts]
                self.plains += [self._plain([p]) for p in self.prompts]
                for w in self.widths:
                    rows = [self.prompts[i % len(self.prompts)] for i in range(w)]
                    self.batches[w].append(self._plain(rows))
                    self.engined[w].append(self._engine_loop(w, 2 * w))
        finally:
            torch.set_num_threads(previous)

    def summary(self) -> dict[str, Any]:
        runs = self.streams
        decode = [r["decode_tok_s"] for r in runs if r["decode_tok_s"] is not None]
        stream = stream_figures([r["ttft_s"] for r in runs], decode, [r["e2e_tok_s"] for r in runs])
        tokens = sum(r["n_tokens"] for r in runs)
        stream.update(
            requests=len(runs),
            tokens=tokens,
            aggregate_tok_s=tokens / sum(r["n_tokens"] / r["e2e_tok_s"] for r in runs),
        )
        out = {
            "threads": self.threads,
            "streamed": stream,
            "plain": {
                "requests": len(self.plains),
                "tok_s_p50": pct([n / s for n, s in self.plains], 50),
                "aggregate_tok_s": sum(n for n, _ in self.plains) / sum(s for _, s in self.plains),
            },
        }
        for w, calls in self.batches.items():
            out[f"batch{w}"] = {
                "calls": len(calls),
                "aggregate_tok_s": sum(n for n, _ in calls) / sum(s for _, s in calls),
            }
        for w, loops in self.engined.items():
            out[f"engine{w}"] = {
                "loops": len(loops),
                "aggregate_tok_s": sum(n for n, _ in loops) / sum(s for _, s in loops),
                "text_mismatches": self.engine_mismatches,
            }
        return out


def write_generator_config(
    tmp: Path, model_dir: Path, adapters: dict[str, str], port: int
) -> tuple[Path, dict[str, Any]]:
    """``configs/serve-llm.yaml`` reduced to its generator (``writer``, with the benchmark's
    LoRA adapters) and the ingress: this model directory, an API key file, a free loopback
    port, and one replica (autoscaling would only add a replica competing for the same two
    cores)."""
    import yaml

    cfg = yaml.safe_load(GEN_CONFIG.read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    args = app["args"]
    args.update(api_key_file=str(key_file), api_key_env=None)
    args.pop("retrieval", None)
    writer = generator_model()
    writer.update(bundle=str(model_dir), device="cpu", adapters=adapters)
    args["models"] = [writer]
    deployments = []
    for entry in app.get("deployments") or []:
        if entry["name"] == f"generator-{writer['name']}":
            entry = {k: v for k, v in entry.items() if k != "autoscaling_config"}
            deployments.append({**entry, "num_replicas": 1})
        elif entry["name"] == "Ingress":
            deployments.append(entry)
    app["deployments"] = deployments
    path = tmp / "serve-llm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, {"model": writer, "deployments": deployments}


@contextmanager
def generator_app(
    model_dir: Path, adapters: dict[str, str], tmp: Path, info: dict[str, Any]
) -> Iterator[str]:
    """Start Ray unless it runs (``ensure_ray``), deploy the generator as ``taskray serve``
    does, wait for ``/readyz``, yield the base URL; shut Serve down however the block ends."""
    from ray import serve

    info["ray_start_s"] = ensure_ray()
    try:
        path, deployed = write_generator_config(tmp, model_dir, adapters, free_port())
        _, url = deploy_and_wait(path, info)
        info["deployed"] = deployed
        yield url
    finally:
        serve.shutdown()  # Ray itself stays up for the next section; main() shuts it down


@dataclass
class GenCell:
    """Completions at one concurrency: TTFT and decode rates of the streamed ones, tokens and
    wall time of all of them."""

    concurrency: int
    seconds: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    e2e_tok_s: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    streamed: int = 0
    finish: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "ok": self.ok,
            "streamed": self.streamed,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "error_samples": self.error_samples,
            "text_mismatches": self.mismatches,
            "finish_reasons": dict(self.finish),
            "seconds": self.seconds,
            "tokens": self.tokens,
            "aggregate_tok_s": self.tokens / self.seconds if self.seconds > 0 else 0.0,
            **stream_figures(self.ttft_s, self.decode_tok_s, self.e2e_tok_s),
            "cpu_ms_per_token": {
                k: v * 1000.0 / self.tokens
                for k, v in sorted(self.cpu_s.items())
                if self.tokens and v > 0
            },
        }


async def _stream_one(client: httpx.AsyncClient, url: str, job: dict[str, Any]) -> dict[str, Any]:
    """One completion: with ``stream: true``, the arrival times of the non-empty text chunks;
    otherwise one JSON answer. Raises on a non-200 answer or an in-band error."""
    body = {
        "model": job["model"],
        "prompt": job["prompt"],
        "stream": job["stream"],
        "max_tokens": job["max_tokens"],
        "temperature": 0.0,
    }
    start = time.perf_counter()
    if not job["stream"]:
        response = await client.post(url, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        choice = response.json()["choices"][0]
        end = time.perf_counter()
        return {"start": start, "end": end, "times": [], "text": choice["text"],
                "finish": choice["finish_reason"]}  # fmt: skip
    times: list[float] = []
    text, finish, done = [], None, False
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"in-band error: {event['error']}")
            choice = event["choices"][0]
            if choice.get("text"):
                times.append(now)
                text.append(choice["text"])
            finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return {"start": start, "end": end, "times": times, "text": "".join(text), "finish": finish}


async def _gen_closed_loop(
    client: httpx.AsyncClient,
    url: str,
    cell: GenCell,
    jobs: list[dict[str, Any]],
    reference: dict[tuple[str, str, int], dict[str, Any]],
    count_tokens: Callable[[str], int],
    n_requests: int,
    time_limit_s: float,
    offset: int = 0,
) -> None:
    issued = 0
    deadline = time.perf_counter() + time_limit_s

    async def one_client() -> None:
        nonlocal issued
        while issued < n_requests and time.perf_counter() < deadline:
            job = jobs[(offset + issued) % len(jobs)]
            issued += 1
            try:
                r = await _stream_one(client, url, job)
            except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as err:
                kind = type(err).__name__
                cell.errors[kind] += 1
                cell.error_samples.setdefault(kind, str(err)[:300])
                continue
            ref = reference[job_key(job)]
            if r["text"] == ref["text"]:
                n, k_first, k_last = ref["n_tokens"], ref["k_first"], ref["k_last"]
            else:  # not the greedy text: count what came back by re-tokenising it
                cell.mismatches += 1
                n = count_tokens(r["text"])
                k_first, k_last = 1, n
            cell.ok += 1
            cell.tokens += n
            cell.finish[str(r["finish"])] += 1
            if not job["stream"]:
                continue
            cell.streamed += 1
            times = r["times"] or [r["end"]]
            cell.ttft_s.append(times[0] - r["start"])
            cell.e2e_tok_s.append(n / (r["end"] - r["start"]))
            rate = decode_rate(k_first, k_last, times[0], times[-1])
            if rate is not None:
                cell.decode_tok_s.append(rate)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(cell.concurrency)))
    cell.seconds = time.perf_counter() - t0


async def _usage_check(
    url: str, reference: dict[tuple[str, str, int], dict[str, Any]], max_tokens: int
) -> dict[str, Any]:
    """Non-streamed completions of every prompt: the server's text and own token count
    (``usage.completion_tokens``) against the in-process reference's text and tokens
    generated."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    rows = []
    async with httpx.AsyncClient(timeout=60.0, headers=headers) as client:
        for prompt in PROMPTS:
            ref = reference[(prompt, "writer", max_tokens)]
            body = {
                "model": "writer",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
            }
            response = await client.post(url, json=body)
            data = response.json() if response.status_code == 200 else {}
            usage = (data.get("usage") or {}).get("completion_tokens")
            text = ((data.get("choices") or [{}])[0]).get("text")
            rows.append({"usage": usage, "text_equal": text == ref["text"], **ref})
    return {
        "texts_equal": all(r["text_equal"] for r in rows),
        "usage_equals_generated": all(r["usage"] == r["n_tokens"] for r in rows),
        "completion_tokens": [r["usage"] for r in rows],
        "generated_tokens": [r["n_tokens"] for r in rows],
    }


async def _measure_stream(
    url: str,
    concurrency: int,
    jobs: list[dict[str, Any]],
    reference: dict[tuple[str, str, int], dict[str, Any]],
    count_tokens: Callable[[str], int],
    n_requests: int,
    time_limit_s: float,
    warmup: int,
) -> GenCell:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(limits=limits, timeout=120.0, headers=headers) as client:
        loop_args = (jobs, reference, count_tokens)
        await _gen_closed_loop(client, url, GenCell(concurrency), *loop_args, warmup, time_limit_s)
        cell = GenCell(concurrency)
        before = cpu_snapshot()
        await _gen_closed_loop(
            client, url, cell, *loop_args, n_requests, time_limit_s, offset=warmup
        )
        after = cpu_snapshot()
        cell.cpu_s = {k: v - before[k] for k, v in after.items() if k in before}
    return cell


def _print_cell(name: str, cell: GenCell) -> None:
    cs = cell.summary()
    errors = f", {cs['errors']} errors {cs['error_kinds']}" if cs["errors"] else ""
    mismatches = f", {cs['text_mismatches']} text mismatches" if cs["text_mismatches"] else ""
    print(
        f"  serve {name} c={cell.concurrency}: TTFT p50 {cs['ttft_p50_ms'] or float('nan'):.1f}"
        f" ms, {cs['aggregate_tok_s']:.0f} tok/s aggregate ({cs['ok']} in "
        f"{cs['seconds']:.1f}s){errors}{mismatches}",
        flush=True,
    )


def measure_generation(smoke: bool, max_tokens: int) -> dict[str, Any]:
    """The generator section: the tiny model (and two LoRA adapters) deployed from
    configs/serve-llm.yaml, streamed over HTTP at each of ``GEN_CONCURRENCY`` and under the
    mixed load, with in-process passes before each of those cells."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    timings: dict[str, float] = {}
    per_client = 3 if smoke else 24  # requests per client in each measured cell
    time_limit_s = 8.0 if smoke else 60.0
    passes = 1 if smoke else 3  # in-process passes over the prompts before each Serve cell
    cells: dict[int, GenCell] = {}
    serve_info: dict[str, Any] = {}
    plain_jobs = [{"prompt": p, "model": "writer", "max_tokens": max_tokens, "stream": True}
                  for p in PROMPTS]  # fmt: skip
    mixed = mixed_jobs(max_tokens)
    with tempfile.TemporaryDirectory(prefix="serve-throughput-gen-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        model_dir = build_tiny_lm(tmp / "tiny-llama")
        adapters = build_adapters(model_dir, tmp)
        timings["model_s"] = time.perf_counter() - t0
        tok = AutoTokenizer.from_pretrained(str(model_dir))

        def count_tokens(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        with generator_app(model_dir, adapters, tmp, serve_info) as url:
            endpoint = f"{url}/v1/completions"
            # In-process while the app is up and idle, a share of the passes before each Serve
            # cell: both share the cores with Ray, and with any drifting load, alike.
            t0 = time.perf_counter()
            ref = InProcess(model_dir, adapters, mixed, GEN_THREADS, max_tokens)
            timings["inprocess_s"] = time.perf_counter() - t0
            reference = ref.reference
            usage = asyncio.run(_usage_check(endpoint, reference, max_tokens))
            for c in (*GEN_CONCURRENCY, "mixed"):
                t0 = time.perf_counter()
                ref.run(passes)
                timings["inprocess_s"] += time.perf_counter() - t0
                s = ref.summary()["streamed"]
                print(
                    f"  in-process generate ({GEN_THREADS} thread, pooled so far): TTFT p50 "
                    f"{s['ttft_p50_ms']:.1f} ms, decode {s['decode_tok_s_p50']:.0f} tok/s",
                    flush=True,
                )
                width = MIXED_CONCURRENCY if c == "mixed" else c
                cell = asyncio.run(
                    _measure_stream(
                        endpoint,
                        width,
                        mixed if c == "mixed" else plain_jobs,
                        reference,
                        count_tokens,
                        per_client * width,
                        time_limit_s,
                        warmup_streams(width),
                    )
                )
                if c == "mixed":
                    mixed_cell = cell
                else:
                    cells[c] = cell
                _print_cell("mixed" if c == "mixed" else "stream", cell)
    timings.update({k: serve_info.pop(k) for k in ("ray_start_s", "serve_ready_s")})
    timings["total_s"] = time.perf_counter() - started
    inproc = {**ref.summary(), "passes_per_cell": passes}
    results = {c: cells[c].summary() for c in GEN_CONCURRENCY}
    mixed_result = {
        **mixed_cell.summary(),
        "jobs": len(mixed),
        "models": ["writer", *ADAPTERS],
        "max_tokens": sorted({j["max_tokens"] for j in mixed}),
        "streamed_share": sum(j["stream"] for j in mixed) / len(mixed),
    }
    return {
        "model": "tiny:llama config + tokenizer, random weights (seed 0), plain HF directory",
        "engine": "continuous batching (actors.engine.ContinuousBatchingEngine)",
        "ray_serve_throughput_optimized": serve_throughput_mode(),
        "config": str(GEN_CONFIG.relative_to(ROOT)),
        "torch_threads": GEN_THREADS,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "prompts": len(PROMPTS),
        "load": {
            "requests_per_client": per_client,
            "time_limit_s": time_limit_s,
            "warmup": {c: warmup_streams(c) for c in GEN_CONCURRENCY},
        },
        "serve": serve_info,
        "usage_check": usage,
        "inprocess": inproc,
        "results": results,
        "mixed": mixed_result,
        "ratios": generator_ratios(results, mixed_result, inproc),
        "timings_s": timings,
        # 1/5/15-minute load averages: other work on a shared machine shows up here
        "load_average": {
            "before": load_before,
            "after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }


def generator_ratios(
    results: dict[int, Any], mixed: dict[str, Any], inproc: dict[str, Any]
) -> dict[str, float | None]:
    """Serve against in-process at each concurrency, TTFT growth, and the mixed load against
    the plain streamed load at the same concurrency."""
    ratios: dict[str, float | None] = {}
    stream = inproc["streamed"]
    for c, r in results.items():
        ratios[f"serve_vs_inprocess_decode_tok_s_c{c}"] = ratio(
            r["decode_tok_s_p50"], stream["decode_tok_s_p50"]
        )
        if f"batch{c}" in inproc:
            ratios[f"serve_c{c}_vs_inprocess_batch{c}_aggregate_tok_s"] = ratio(
                r["aggregate_tok_s"], inproc[f"batch{c}"]["aggregate_tok_s"]
            )
            # the scheduler alone (no Serve) against static batching: what is left is transport
            ratios[f"engine_c{c}_vs_inprocess_batch{c}_aggregate_tok_s"] = ratio(
                inproc[f"engine{c}"]["aggregate_tok_s"], inproc[f"batch{c}"]["aggregate_tok_s"]
            )
        else:
            ratios[f"serve_c{c}_vs_inprocess_generate_aggregate_tok_s"] = ratio(
                r["aggregate_tok_s"], inproc["plain"]["aggregate_tok_s"]
            )
        for q in ("p50", "p99"):
            serve_ttft, ref_ttft = r[f"ttft_{q}_ms"], stream[f"ttft_{q}_ms"]
            ratios[f"ttft_{q}_overhead_ms_c{c}"] = (
                serve_ttft - ref_ttft if serve_ttft is not None and ref_ttft is not None else None
            )
    top, one = max(results), min(results)
    ratios[f"ttft_p50_c{top}_over_c{one}"] = ratio(
        results[top]["ttft_p50_ms"], results[one]["ttft_p50_ms"]
    )
    same = results.get(MIXED_CONCURRENCY)
    if same is not None:
        for key in ("aggregate_tok_s", "ttft_p50_ms", "decode_tok_s_p50"):
            ratios[f"mixed_vs_plain_{key}_c{MIXED_CONCURRENCY}"] = ratio(mixed[key], same[key])
    return ratios


def warmup_streams(concurrency: int) -> int:
    """Streamed requests sent (and discarded) before measuring at this concurrency."""
    return 2 * concurrency + 2


# ----- report -----------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def _by_concurrency(by_c: dict[Any, Any]) -> dict[int, Any]:
    """Concurrency-keyed figures with int keys (JSON turns them into strings)."""
    return {int(c): v for c, v in by_c.items()}


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
    rows = [
        r
        for r in ("classifier", "generator")
        if ("results" in report if r == "classifier" else "generator" in report)
    ]
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.5, 3.8 * len(rows)), squeeze=False)
    for (left, right), row in zip(axes, rows, strict=True):
        if row == "classifier":
            _chart_classifier(report, left, right)
        else:
            _chart_generator(report["generator"], left, right)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _chart_classifier(report: dict[str, Any], left: Any, right: Any) -> None:
    colours = {"serve_batched": "#2a7", "serve_unbatched": "#77a", "fastapi_pipeline": "#999"}
    for system, by_c in report["results"].items():
        by_c = _by_concurrency(by_c)
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
    results = _by_concurrency(gen["results"])
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
    mixed = gen.get("mixed")
    if mixed:
        c = mixed["concurrency"]
        left.plot([c], [mixed["aggregate_tok_s"]], "D", color="#c52",
                  label="Serve, mixed load")  # fmt: skip
        right.plot([c], [mixed["ttft_p50_ms"]], "D", color="#c52", label="mixed load p50")
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
        f"tiny llama, {gen['max_tokens']} tokens/request, greedy, "
        f"{gen['torch_threads']} torch thread",
        fontsize=9,
        loc="left",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline_server(str(args.bundle), args.port, args.threads)
        return
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
            print(f"generator (tiny llama, {args.max_tokens} tokens per request, streamed):")
            report["generator"] = measure_generation(args.smoke, args.max_tokens)
            print_generator_table(report["generator"])
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


def serve_throughput_mode() -> bool:
    """Whether this run used Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` mode (inherited by the
    local instance the benchmark starts)."""
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0").lower() in ("1", "true")


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
    results = _by_concurrency(gen["results"])
    inproc = gen["inprocess"]

    def fmt(value: float | None, digits: int = 1) -> str:
        return f"{value:.{digits}f}" if value is not None else "-"

    print(
        f"\ntiny llama (random weights), {gen['max_tokens']} new tokens per request, greedy, "
        f"{gen['torch_threads']} torch thread(s), {gen['prompts']} prompts; TTFT = first "
        "non-empty text piece"
    )
    print(
        f"{'system':<24} {'conc':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'decode':>8} "
        f"{'aggr.':>8} {'ok':>5} {'err':>4}"
    )
    print(f"{'':<24} {'':>4} {'ms':>9} {'ms':>9} {'tok/s':>8} {'tok/s':>8}")
    rows = [("serve SSE", c, r) for c, r in sorted(results.items())]
    if gen.get("mixed"):
        rows.append(("serve mixed", gen["mixed"]["concurrency"], gen["mixed"]))
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


if __name__ == "__main__":
    main()
