"""Soak: one Serve application under steady load for a fixed time, on loopback. Three routes
at once: classification (``/v1/tasks/classification``), generation (OpenAI ``/v1/completions``)
and RAG (``/v1/rag``: retrieve from Qdrant, then generate). Records requests, errors and
p50/p99 latency per route, and the resident memory (RSS) of every Serve process before and
after, against a stated bound.

    flock /tmp/taskray-ray.lock python benchmarks/soak.py                  # 60 s
    flock /tmp/taskray-ray.lock python benchmarks/soak.py --smoke          # 10 s, what CI runs
    flock /tmp/taskray-ray.lock python benchmarks/soak.py --seconds 300 --concurrency 9

(Only one Ray cluster may run on the machine at a time, hence the shared lock.)

The application, built in a temporary directory and deployed as ``taskray serve`` does
(``cluster.serving``), API key auth on:

- ``sentiment``: a classification bundle of the pretrained all-MiniLM-L6-v2 encoder with a
  random two-label head (``serve_bench.classifier.build_untrained_bundle``: latency and memory
  do not depend on the weights), one replica;
- ``lm``: ``tiny:llama`` with random weights (``serve_bench.generator.build_tiny_lm``), greedy,
  ``--max-tokens`` new tokens per request (default 16), one replica;
- a retriever over a local Qdrant folder holding the fixture corpus (218 documents, ~223
  chunks, all-MiniLM-L6-v2) and a RAG pipeline answering with ``lm``.

The load: ``--concurrency`` closed-loop clients (default 6), dealt round-robin to the three
routes (so 2 per route by default), each sending its next request as soon as the last one is
answered, from one asyncio ``httpx`` client in this process, until ``--seconds`` have passed
(requests in flight then finish). A 3 s warm-up (one client per route) runs first. Every
response must be HTTP 200 with the expected body (a label; a completion text; an answer with
passages); anything else counts as an error, and errors must be 0 (the exit status is 1
otherwise). Latency percentiles are over successful requests.

Memory: the RSS of every Serve replica, the Serve proxy and the Serve controller is read from
``/proc/<pid>/status`` (Linux only) after the warm-up ("before") and after the load ("after"),
and sampled every second in between (the chart). The bound, reported and not asserted: each
process grows by less than 50 MB and by less than 15 % of its RSS before the load (both). A
process that disappears (a replica that died and was replaced) fails the bound.

Prints two tables and writes benchmarks/results/soak[-smoke].{json,png} (latency over time per
route, and RSS growth over time per process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval import corpus_documents  # noqa: E402  (benchmarks/retrieval.py)
from serve_bench.classifier import build_untrained_bundle  # noqa: E402  (benchmarks/serve_bench)
from serve_bench.generator import build_tiny_lm  # noqa: E402
from serve_bench.workload import REVIEWS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ROOT / "data" / "fixtures" / "retrieval_questions.jsonl"
APP = "soak"
API_KEY = "soak-benchmark-key"
NUM_CPUS = 2
ROUTES = ("classification", "generation", "rag")
GROWTH_MB = 50.0  # the memory bound: less than this ...
GROWTH_FRACTION = 0.15  # ... and less than this fraction of the RSS before the load
PROMPTS = [
    "Write a short note about the train timetable.",
    "Summarize the following article in one sentence.",
    "Question: what is 12 times 7? Answer:",
    "You are a helpful assistant. Please answer briefly and politely.",
    "Paris is the capital of France; Berlin is",
    "The quick brown fox",
]


# ----- the application ----------------------------------------------------------------------
def build_app(tmp: Path, max_tokens: int, port: int) -> Path:
    """Models, the Qdrant index and the Serve config file in ``tmp``; the config's path."""
    import yaml

    from actors.embedder import Embedder
    from actors.indexing import index_documents
    from actors.vectorstore import QdrantOptions, VectorStore

    bundle = build_untrained_bundle(tmp / "bundle")
    lm = build_tiny_lm(tmp / "lm")
    qdrant = {"path": str(tmp / "qdrant"), "collection": "docs"}
    with VectorStore.open(QdrantOptions(**qdrant)) as store:  # closed before Serve opens it
        index_documents(corpus_documents(), Embedder("all-MiniLM-L6-v2", "cpu"), store)
    (tmp / "api-key").write_text(API_KEY)
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {
                    "api_key_file": str(tmp / "api-key"),
                    "models": [
                        {"name": "sentiment", "bundle": str(bundle), "num_cpus": 0.5},
                        {
                            "name": "lm",
                            "bundle": str(lm),
                            "num_cpus": 0.5,
                            "generation": {"max_new_tokens": max_tokens},
                        },
                    ],
                    "retrieval": {
                        "qdrant": qdrant,
                        "default_k": 3,
                        "num_cpus": 0.25,
                        # Passages are counted in the tiny llama's byte-level tokens (~4 per
                        # MiniLM token): 1500 holds about three 128-token chunks.
                        "rag": {"generator": "lm", "passage_budget": 1500, "num_cpus": 0.1},
                    },
                },
            }
        ],
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- memory -------------------------------------------------------------------------------
def serve_processes() -> dict[int, str]:
    """pid → label of this application's Serve processes: ``replica:<deployment>``,
    ``serve_proxy``, ``serve_controller`` (from the process titles Ray sets)."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith(f"ray::ServeReplica:{APP}:"):
            # The title may end with the method last run: ``<deployment>.<method>``.
            deployment = argv0.removeprefix(f"ray::ServeReplica:{APP}:").split(".", 1)[0]
            out[int(entry.name)] = f"replica:{deployment}"
        elif argv0.startswith("ray::ProxyActor"):
            out[int(entry.name)] = "serve_proxy"
        elif argv0.startswith("ray::ServeController"):
            out[int(entry.name)] = "serve_controller"
    return out


def rss_mb(pid: int) -> float | None:
    """Resident set size of a process in MB (10^6 bytes), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


class MemorySampler:
    """RSS of the Serve processes every ``interval_s`` seconds, in a thread."""

    def __init__(self, processes: dict[int, str], interval_s: float = 1.0) -> None:
        self.processes = processes
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[int, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def snapshot(self) -> dict[int, float | None]:
        return {pid: rss_mb(pid) for pid in self.processes}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self.snapshot()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def memory_report(
    processes: dict[int, str], before: dict[int, float | None], after: dict[int, float | None]
) -> list[dict[str, Any]]:
    """Per process: RSS before and after, growth, and whether it is within the bound."""
    rows = []
    for pid, label in sorted(processes.items(), key=lambda kv: kv[1]):
        b, a = before.get(pid), after.get(pid)
        growth = a - b if a is not None and b is not None else None
        ok = growth is not None and (
            growth <= 0 or (growth < GROWTH_MB and growth < GROWTH_FRACTION * (b or 0.0))
        )
        rows.append(
            {
                "process": label,
                "pid": pid,
                "rss_before_mb": b,
                "rss_after_mb": a,
                "growth_mb": growth,
                "growth_fraction": growth / b if growth is not None and b else None,
                "within_bound": bool(ok),
                "note": "" if a is not None else "process gone (died during the soak)",
            }
        )
    return rows


# ----- load ---------------------------------------------------------------------------------
@dataclass
class Route:
    """One route: how to make a request body and how to tell a good answer."""

    name: str
    path: str
    inputs: list[str]

    def body(self, text: str, max_tokens: int) -> dict[str, Any]:
        if self.name == "classification":
            return {"text": text}
        if self.name == "generation":
            return {"model": "lm", "prompt": text, "max_tokens": max_tokens, "temperature": 0}
        return {"question": text, "k": 3}

    def good(self, data: Any) -> bool:
        if self.name == "classification":
            return isinstance(data["predictions"][0]["label"], str)
        if self.name == "generation":
            return isinstance(data["choices"][0]["text"], str)
        return isinstance(data["answer"], str) and bool(data["passages"])


@dataclass
class Log:
    """Every request: route, start (s since the load began), latency (s), outcome."""

    t0: float = field(default_factory=time.perf_counter)
    rows: list[tuple[str, float, float, str]] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)


async def closed_loop(
    url: str, routes: list[Route], concurrency: int, seconds: float, max_tokens: int, log: Log
) -> None:
    """``concurrency`` clients (client i on route i mod 3) until ``seconds`` have passed."""
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=60.0, headers=headers
    ) as http:

        async def client(i: int) -> None:
            route = routes[i % len(routes)]
            rng = random.Random(i)
            while time.perf_counter() < deadline:
                text = rng.choice(route.inputs)
                start = time.perf_counter()
                try:
                    response = await http.post(route.path, json=route.body(text, max_tokens))
                    if response.status_code != 200:
                        kind, detail = f"HTTP {response.status_code}", response.text
                    elif not route.good(response.json()):
                        kind, detail = "bad body", response.text
                    else:
                        kind, detail = "ok", ""
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as err:
                    kind, detail = type(err).__name__, str(err)
                end = time.perf_counter()
                log.rows.append((route.name, start - log.t0, end - start, kind))
                if kind != "ok":
                    log.samples.setdefault(f"{route.name}: {kind}", detail[:300])

        await asyncio.gather(*(client(i) for i in range(concurrency)))


def route_summary(log: Log, seconds: float) -> dict[str, dict[str, Any]]:
    """Per route: requests, errors (by kind), req/s and latency percentiles (ms)."""
    out = {}
    for name in ROUTES:
        rows = [r for r in log.rows if r[0] == name]
        ok = np.array([r[2] for r in rows if r[3] == "ok"]) * 1000.0
        errors = Counter(r[3] for r in rows if r[3] != "ok")
        out[name] = {
            "requests": len(rows),
            "errors": sum(errors.values()),
            "error_kinds": dict(errors),
            "requests_per_s": len(ok) / seconds if seconds else 0.0,
            "p50_ms": float(np.percentile(ok, 50)) if len(ok) else None,
            "p99_ms": float(np.percentile(ok, 99)) if len(ok) else None,
            "max_ms": float(ok.max()) if len(ok) else None,
        }
    return out


# ----- output -------------------------------------------------------------------------------
def print_tables(report: dict[str, Any]) -> None:
    print(
        f"\nsoak: {report['seconds']:.0f} s at concurrency {report['concurrency']} "
        f"({report['machine']['cpus']} CPUs)"
    )
    print(f"{'route':<15}{'requests':>9}{'errors':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in report["routes"].items():
        p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
        print(
            f"{name:<15}{r['requests']:>9}{r['errors']:>7}{r['requests_per_s']:>8.1f}"
            f"{p50:>9}{p99:>9}"
        )
    for kind, sample in report["error_samples"].items():
        print(f"  error {kind}: {sample}")
    print(
        f"\nRSS (MB) after warm-up → after the load; bound: growth < {GROWTH_MB:.0f} MB and "
        f"< {GROWTH_FRACTION:.0%} per process"
    )
    print(f"{'process':<34}{'before':>8}{'after':>8}{'growth':>8}{'%':>7}  bound")
    for m in report["memory"]:
        b = f"{m['rss_before_mb']:.0f}" if m["rss_before_mb"] is not None else "-"
        a = f"{m['rss_after_mb']:.0f}" if m["rss_after_mb"] is not None else "gone"
        g = f"{m['growth_mb']:+.1f}" if m["growth_mb"] is not None else "-"
        f = f"{m['growth_fraction']:+.1%}" if m["growth_fraction"] is not None else "-"
        verdict = "pass" if m["within_bound"] else "FAIL"
        print(f"{m['process']:<34}{b:>8}{a:>8}{g:>8}{f:>7}  {verdict}")
    print(
        f"\nerrors: {report['errors']} ({'pass' if report['errors'] == 0 else 'FAIL'}); "
        f"memory bound: {'pass' if report['memory_within_bound'] else 'FAIL'}"
    )


def make_chart(report: dict[str, Any], log: Log, path: Path) -> None:
    """Top: latency over time per route (points, and the p50 of each 2 s bin). Bottom: RSS
    growth over time per Serve process."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")
        return
    colours = {"classification": "#2a7", "generation": "#c62", "rag": "#36b"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 7.5))
    for name in ROUTES:
        rows = [(t + lat, lat * 1000.0) for n, t, lat, k in log.rows if n == name and k == "ok"]
        if not rows:
            continue
        ts, ms = np.array(rows).T
        top.scatter(ts, ms, s=2, alpha=0.25, color=colours[name])
        bins = np.arange(0.0, ts.max() + 2.0, 2.0)
        idx = np.digitize(ts, bins)
        centres = [bins[i - 1] + 1.0 for i in sorted(set(idx))]
        p50 = [float(np.percentile(ms[idx == i], 50)) for i in sorted(set(idx))]
        r = report["routes"][name]
        top.plot(centres, p50, "-", color=colours[name],
                 label=f"{name}: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")  # fmt: skip
    top.set_yscale("log")
    top.set_xlabel("seconds into the soak")
    top.set_ylabel("latency (ms, log)")
    top.set_title(
        f"soak: {report['seconds']:.0f} s, concurrency {report['concurrency']}, "
        f"{report['errors']} errors (points: requests; lines: p50 per 2 s)"
    )
    top.legend(fontsize=8)
    for m in report["memory"]:
        pid, base = m["pid"], m["rss_before_mb"]
        series = [(t, s[pid] - base) for t, s in report["rss_samples"] if s.get(pid) and base]
        if series:
            xs, ys = zip(*series, strict=True)
            bottom.plot(xs, ys, "-", label=f"{m['process']} ({base:.0f} MB before)")
    bottom.axhline(0.0, color="#999", linewidth=0.8)
    bottom.set_xlabel("seconds into the soak")
    bottom.set_ylabel("RSS growth since the warm-up (MB)")
    bottom.set_title(
        f"RSS growth per Serve process (bound: < {GROWTH_MB:.0f} MB and < {GROWTH_FRACTION:.0%}"
        f"): {'pass' if report['memory_within_bound'] else 'FAIL'}"
    )
    bottom.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- main ---------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="10 s instead of 60 s")
    parser.add_argument("--seconds", type=float, help="length of the soak (60; smoke 10)")
    parser.add_argument("--concurrency", type=int, default=6, help="clients, over 3 routes")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per generation")
    args = parser.parse_args()
    seconds = args.seconds or (10.0 if args.smoke else 60.0)
    if args.concurrency < len(ROUTES):
        parser.error(f"--concurrency must be at least {len(ROUTES)} (one client per route)")

    import ray
    from ray import serve

    from cluster import serving

    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()]
    routes = [
        Route("classification", "/v1/tasks/classification", REVIEWS),
        Route("generation", "/v1/completions", PROMPTS),
        Route("rag", "/v1/rag", questions),
    ]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taskray-soak-") as tmp:
        path = build_app(Path(tmp), args.max_tokens, free_port())
        t_built = time.perf_counter()
        ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
        try:
            config = serving.load_serve_config(str(path))
            url = serving.base_url(config)
            serving.deploy(config)
            serving.wait_ready(url, timeout_s=300, progress=lambda *_: None)
            t_ready = time.perf_counter()
            print(f"ready in {t_ready - t_built:.0f} s (models and index built in "
                  f"{t_built - t_start:.0f} s); warming up", flush=True)  # fmt: skip
            warm = Log()
            asyncio.run(closed_loop(url, routes, len(ROUTES), 3.0, args.max_tokens, warm))
            processes = serve_processes()
            before = {pid: rss_mb(pid) for pid in processes}
            print(f"soak: {seconds:.0f} s at concurrency {args.concurrency}", flush=True)
            log = Log()
            with MemorySampler(processes) as sampler:
                asyncio.run(
                    closed_loop(url, routes, args.concurrency, seconds, args.max_tokens, log)
                )
            soaked = time.perf_counter() - log.t0
            after = {pid: rss_mb(pid) for pid in processes}
            replicas_after = serve_processes()
        finally:
            serve.shutdown()
            ray.shutdown()
    memory = memory_report(processes, before, after)
    summary = route_summary(log, soaked)
    report = {
        "seconds": soaked,
        "concurrency": args.concurrency,
        "clients_per_route": {
            r.name: len(range(i, args.concurrency, len(ROUTES))) for i, r in enumerate(routes)
        },
        "max_tokens": args.max_tokens,
        "routes": summary,
        "requests": sum(r["requests"] for r in summary.values()),
        "errors": sum(r["errors"] for r in summary.values()),
        "error_samples": log.samples,
        "warmup": {"requests": len(warm.rows), "errors": sum(r[3] != "ok" for r in warm.rows)},
        "memory": memory,
        "memory_bound": {"growth_mb_below": GROWTH_MB, "growth_fraction_below": GROWTH_FRACTION},
        "memory_within_bound": all(m["within_bound"] for m in memory),
        "same_processes_after": set(replicas_after) == set(processes),
        "rss_samples": [(t, s) for t, s in sampler.samples],
        "startup_s": {"build": t_built - t_start, "deploy_until_ready": t_ready - t_built},
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": NUM_CPUS},
        "smoke": args.smoke,
    }
    print_tables(report)
    suffix = "-smoke" if args.smoke else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"soak{suffix}.json").write_text(json.dumps(report, indent=2))
    make_chart(report, log, RESULTS / f"soak{suffix}.png")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
