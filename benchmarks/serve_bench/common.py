"""What both halves share: paths and the Ray set-up, Ray and Serve start-up as ``taskray serve``
does it, the CPU accounting by process (``/proc``), and the statistics every figure goes
through."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from .workload import MIXED_CONCURRENCY

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
ENTRY = ROOT / "benchmarks" / "serve_throughput.py"  # the CLI (also runs the baseline server)
NUM_CPUS = 2
API_KEY = "serve-throughput-benchmark-key"


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


# ----- Ray and Serve -----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keyed_config(source: Path, tmp: Path, port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Serve config file of this checkout on loopback ``port``, its first application asking
    for ``API_KEY`` (from a key file written to ``tmp``): (the config, that application)."""
    import yaml

    cfg = yaml.safe_load(source.read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    app = cfg["applications"][0]
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    app["args"].update(api_key_file=str(key_file), api_key_env=None)
    return cfg, app


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


def serve_throughput_mode() -> bool:
    """Whether this run used Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` mode (inherited by the
    local instance the benchmark starts)."""
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0").lower() in ("1", "true")


# ----- statistics --------------------------------------------------------------------------------
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


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def by_concurrency(by_c: dict[Any, Any]) -> dict[int, Any]:
    """Concurrency-keyed figures with int keys (JSON turns them into strings)."""
    return {int(c): v for c, v in by_c.items()}


def cpu_split(cpu_s: dict[str, float], engine: dict[str, Any], tokens: int) -> dict[str, Any]:
    """All the CPU per token (the processes counted in ``cpu_s``) split into the model's
    steps (the engine thread, from ``engine_figures``) and everything else: Serve's transport,
    the replica's other threads, the clients, Ray's daemons. Empty without the figures."""
    engine_cpu = engine.get("thread_cpu_s")
    if engine_cpu is None or not tokens or not cpu_s:
        return {}
    engine_ms = engine_cpu * 1000.0 / tokens
    total_ms = sum(cpu_s.values()) * 1000.0 / tokens
    return {"cpu_ms_per_token_split": {"engine_thread": engine_ms,
                                       "everything_else": total_ms - engine_ms}}  # fmt: skip


# Processes whose CPU goes by the second, not by the token (Ray's daemons, Serve's controller)
PER_SECOND = ("ray_daemons", "serve_controller")


def usable_cores() -> int:
    """The cores this process (and the Ray workers it starts) may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_ceiling_tok_s(cell: dict[str, Any], engine: dict[str, Any], cores: int) -> float | None:
    """The most tokens a second Serve could deliver on ``cores`` if this cell's costs per token
    stayed as measured and every core were busy all the time:

    - outside the model, ``cpu_ms_per_token_split["everything_else"]`` (Serve's hops, the
      replica's other threads, this benchmark's clients on the same cores) less what goes by
      the second (``PER_SECOND``, taken off the cores instead);
    - the model, what the engine's thread costs in process at a full batch (``engine``, the
      in-process ``engine{c}`` figures: its CPU per token, else its wall time per token);
    - and no faster than that one thread can step on one core.

    A ceiling for this harness and this message budget (a replica's stream messages go by
    the second, so at a higher rate each token would carry fewer): a ratio below a target
    means no scheduler reaches that target here without cheaper transport."""
    rest = (cell.get("cpu_ms_per_token_split") or {}).get("everything_else")
    model_ms = engine.get("cpu_ms_per_token") or (
        1000.0 / engine["aggregate_tok_s"] if engine.get("aggregate_tok_s") else None
    )
    if rest is None or not model_ms:
        return None
    per_token = cell.get("cpu_ms_per_token", {})
    fixed_ms = sum(per_token.get(k, 0.0) for k in PER_SECOND)
    fixed_cores = fixed_ms * cell["aggregate_tok_s"] / 1000.0
    return min((cores - fixed_cores) * 1000.0 / (rest - fixed_ms + model_ms), 1000.0 / model_ms)


def generator_ratios(
    results: dict[int, Any],
    mixed: dict[str, Any],
    inproc: dict[str, Any],
    staggered: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """Serve against in-process at each concurrency (and the most Serve could reach on this
    machine's cores at each cell's costs, ``cpu_ceiling_tok_s``), TTFT growth (under
    the plain load and the staggered one), and the mixed and staggered loads against the plain
    streamed load at the same concurrency."""
    cores = usable_cores()
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
            ratios[f"cpu_ceiling_c{c}_vs_inprocess_batch{c}"] = ratio(
                cpu_ceiling_tok_s(r, inproc[f"engine{c}"], cores),
                inproc[f"batch{c}"]["aggregate_tok_s"],
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
            if staggered is not None:
                ratios[f"staggered_vs_plain_{key}_c{MIXED_CONCURRENCY}"] = ratio(
                    staggered[key], same[key]
                )
    # Each load against its own work in process (the engine without Serve): the mixed load's
    # adapters and shorter requests cost the model more per token there too, so this shows
    # what Serve adds to each load apart from what the work itself costs.
    c = MIXED_CONCURRENCY
    mixed_engine, plain_engine = inproc.get(f"engine_mixed{c}"), inproc.get(f"engine{c}")
    if mixed_engine and plain_engine and same is not None:
        mixed_share = ratio(mixed["aggregate_tok_s"], mixed_engine["aggregate_tok_s"])
        plain_share = ratio(same["aggregate_tok_s"], plain_engine["aggregate_tok_s"])
        ratios[f"inprocess_engine_mixed_vs_plain_aggregate_tok_s_c{c}"] = ratio(
            mixed_engine["aggregate_tok_s"], plain_engine["aggregate_tok_s"]
        )
        ratios[f"serve_mixed_vs_inprocess_engine_mixed_aggregate_tok_s_c{c}"] = mixed_share
        ratios[f"serve_c{c}_vs_inprocess_engine{c}_aggregate_tok_s"] = plain_share
        ratios[f"mixed_vs_plain_serve_share_of_inprocess_engine_c{c}"] = ratio(
            mixed_share, plain_share
        )
    if staggered is not None:
        ratios[f"ttft_p50_c{MIXED_CONCURRENCY}_staggered_over_c{one}"] = ratio(
            staggered["ttft_p50_ms"], results[one]["ttft_p50_ms"]
        )
    return ratios
