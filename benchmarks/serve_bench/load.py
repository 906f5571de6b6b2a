"""The load generator: closed-loop HTTP clients on one asyncio ``httpx.AsyncClient`` in this
process. ``concurrency`` clients each send their next request as soon as the previous one is
answered, after a warm-up, until a request count or a time limit is reached; every cell records
what came back, how fast, and the CPU time each process spent meanwhile."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from .common import API_KEY, cpu_snapshot, cpu_split, decode_rate, stream_figures
from .workload import REVIEWS, job_key


# ----- the classifier: one review per request ------------------------------------------------
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


async def run_clients(
    concurrency: int,
    n_requests: int,
    time_limit_s: float,
    send: Callable[[int], Awaitable[None]],
    stagger_s: float = 0.0,
) -> float:
    """The closed loop: ``concurrency`` clients, each calling ``send(i)`` (``i``: how many
    requests were sent before this one) as soon as its previous call returned, until
    ``n_requests`` have been sent or ``time_limit_s`` has passed (in-flight ones finish).
    Client k starts ``k * stagger_s`` seconds after the first. Returns the wall time."""
    issued = 0
    deadline = time.perf_counter() + time_limit_s

    async def one_client(k: int) -> None:
        nonlocal issued
        await asyncio.sleep(k * stagger_s)
        while issued < n_requests and time.perf_counter() < deadline:
            i = issued
            issued += 1
            await send(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    return time.perf_counter() - t0


async def _closed_loop(
    client: httpx.AsyncClient,
    target: Target,
    cell: Cell,
    n_requests: int,
    time_limit_s: float,
    offset: int = 0,
) -> None:
    """Classify reviews (cycled from ``offset``) in a closed loop of ``cell.concurrency``
    clients; record latencies of good answers, and errors by kind, in ``cell``."""

    async def send(i: int) -> None:
        text = REVIEWS[(offset + i) % len(REVIEWS)]
        start = time.perf_counter()
        try:
            response = await client.post(target.url, json=target.body(text))
            if response.status_code != 200:
                kind, detail = f"HTTP {response.status_code}", response.text
            elif not target.check(response.json()):
                kind, detail = "bad body", response.text
            else:
                cell.latencies_s.append(time.perf_counter() - start)
                return
        except (httpx.HTTPError, ValueError) as err:
            kind, detail = type(err).__name__, str(err)
        cell.errors[kind] += 1
        cell.error_samples.setdefault(kind, detail[:300])

    cell.seconds = await run_clients(cell.concurrency, n_requests, time_limit_s, send)


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


def has_label(pred: Any) -> bool:
    """A prediction object with a string label."""
    return isinstance(pred, dict) and isinstance(pred.get("label"), str)


# ----- the generator: completions, streamed over SSE or not ----------------------------------
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
    engine: dict[str, Any] = field(default_factory=dict)

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
            **({"engine": self.engine} if self.engine else {}),
            **cpu_split(self.cpu_s, self.engine, self.tokens),
        }

    def report_line(self, name: str) -> str:
        """One line for the console: TTFT, aggregate, errors, and the engine's figures."""
        cs = self.summary()
        errors = f", {cs['errors']} errors {cs['error_kinds']}" if cs["errors"] else ""
        mismatches = f", {cs['text_mismatches']} text mismatches" if cs["text_mismatches"] else ""
        engine = self.engine
        engine_line = ""
        if engine.get("mean_decode_batch") is not None:
            engine_line = (
                f"; engine: mean decode batch {engine['mean_decode_batch']:.1f}, busy "
                f"{engine['busy_share']:.0%} of the time, prefill "
                f"{engine['prefill_share_of_busy']:.0%} of that"
            )
        if engine.get("mean_first_token_ms") is not None:
            engine_line += (
                f", first token {engine['mean_first_token_ms']:.0f} ms after submit (mean; "
                f"{engine['mean_waiting_ms']:.0f} ms before its prefill)"
            )
        return (
            f"  serve {name} c={self.concurrency}: TTFT p50 "
            f"{cs['ttft_p50_ms'] or float('nan'):.1f} ms, {cs['aggregate_tok_s']:.0f} tok/s "
            f"aggregate ({cs['ok']} in {cs['seconds']:.1f}s){errors}{mismatches}{engine_line}"
        )


def engine_figures(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What the replica's engine did between two ``stats()`` snapshots: decode steps and their
    mean batch, prefill calls and the requests they took in, its time (busy share of the
    wall time; prefill share of the busy time), and its requests' mean wait for their prefill
    and for their first token."""

    def delta(key: str) -> dict[int, int]:
        new = {int(k): v - before[key].get(k, 0) for k, v in after[key].items()}
        return {k: v for k, v in new.items() if v}

    decode, prefill = delta("decode_batch_sizes"), delta("prefill_batch_sizes")
    steps = sum(decode.values())
    secs = {k: after["seconds"][k] - before["seconds"].get(k, 0.0) for k in after["seconds"]}
    busy = secs.get("prefill", 0.0) + secs.get("decode", 0.0)
    # an engine behind the Engine interface need not sum latencies (figures then None)
    lat = {k: v - before.get("latency_s", {}).get(k, 0)
           for k, v in after.get("latency_s", {}).items()}  # fmt: skip
    n = lat.get("requests", 0)
    cpu0, cpu1 = before.get("thread_cpu_s"), after.get("thread_cpu_s")
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        # mean ms from the replica's submit to its prefill, and to its first token: TTFT
        # measured by the client minus this is what the hops and the client itself add
        "mean_waiting_ms": 1000 * lat["waiting"] / n if n else None,
        "mean_first_token_ms": 1000 * lat["first_token"] / n if n else None,
        "decode_steps": steps,
        "mean_decode_batch": sum(k * v for k, v in decode.items()) / steps if steps else None,
        "prefill_calls": sum(prefill.values()),
        "prefilled_requests": sum(k * v for k, v in prefill.items()),
        "seconds": {k: round(v, 3) for k, v in secs.items()},
        "busy_share": busy / wall_s if wall_s > 0 else None,
        "prefill_share_of_busy": secs.get("prefill", 0.0) / busy if busy > 0 else None,
        # its thread's CPU over its busy time: below 1, it waited for a core or the GIL
        "thread_cpu_s": cpu,
        "on_cpu_share_of_busy": cpu / busy if cpu is not None and busy > 0 else None,
        # prompt tokens run and reused from the prefix cache (by how many requests); packed rows
        **{k: after.get(k, 0) - before.get(k, 0)
           for k in ("prefill_tokens", "prefix_tokens", "prefix_hits", "packed_prefills")},
    }  # fmt: skip


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
    stagger_s: float = 0.0,
) -> None:
    """Send ``jobs`` (cycled from ``offset``) in a closed loop of ``cell.concurrency`` clients
    (started ``stagger_s`` apart); count each answer's tokens against ``reference``
    (re-tokenised when the text differs). Latencies count only requests sent once every
    client has started (a staggered start's ramp runs below the cell's concurrency)."""
    steady = time.perf_counter() + (cell.concurrency - 1) * stagger_s

    async def send(i: int) -> None:
        job = jobs[(offset + i) % len(jobs)]
        try:
            r = await _stream_one(client, url, job)
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as err:
            kind = type(err).__name__
            cell.errors[kind] += 1
            cell.error_samples.setdefault(kind, str(err)[:300])
            return
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
        if not job["stream"] or r["start"] < steady:
            return
        cell.streamed += 1
        times = r["times"] or [r["end"]]
        cell.ttft_s.append(times[0] - r["start"])
        cell.e2e_tok_s.append(n / (r["end"] - r["start"]))
        rate = decode_rate(k_first, k_last, times[0], times[-1])
        if rate is not None:
            cell.decode_tok_s.append(rate)

    cell.seconds = await run_clients(cell.concurrency, n_requests, time_limit_s, send, stagger_s)


async def _measure_stream(
    url: str,
    concurrency: int,
    jobs: list[dict[str, Any]],
    reference: dict[tuple[str, str, int], dict[str, Any]],
    count_tokens: Callable[[str], int],
    n_requests: int,
    time_limit_s: float,
    warmup: int,
    engine_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    stagger_s: float = 0.0,
) -> GenCell:
    """Warm up, then measure one cell (clients started ``stagger_s`` apart in both);
    ``engine_stats`` (the replica's engine ``stats()``), when given, is read around the
    measured part (``engine_figures``)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(limits=limits, timeout=120.0, headers=headers) as client:
        loop_args = (jobs, reference, count_tokens)
        await _gen_closed_loop(client, url, GenCell(concurrency), *loop_args, warmup,
                               time_limit_s, stagger_s=stagger_s)  # fmt: skip
        cell = GenCell(concurrency)
        engine_before = await engine_stats() if engine_stats is not None else {}
        before = cpu_snapshot()
        await _gen_closed_loop(
            client, url, cell, *loop_args, n_requests, time_limit_s, warmup, stagger_s
        )
        after = cpu_snapshot()
        cell.cpu_s = {k: v - before[k] for k, v in after.items() if k in before}
        if engine_stats is not None:
            engine_after = await engine_stats()
            cell.engine = engine_figures(engine_before, engine_after, cell.seconds)
    return cell
