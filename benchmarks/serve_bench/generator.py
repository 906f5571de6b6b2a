"""The generator half: causal LMs streamed over SSE from ``/v1/completions`` (continuous
batching) vs ``generate`` and taskray's engine in this process, and a mixed load.

The models: ``tiny:llama`` (``actors.tiny``, a 600-token byte-level BPE) with random weights
(seed 0), at two sizes (``workload.GEN_MODELS``): ``toy`` (2 layers, hidden size 64; about
1-2 ms a token on one thread, so it magnifies the per-token cost of serving) and ``small`` (6
layers, hidden size 384, 12M parameters; a batched decode step of 16 costs about what a 7B-13B
model's does on one GPU, so the transport share is closer to a real deployment's). Each is
saved with its tokenizer as a plain HF model directory in a temporary directory, with two LoRA
adapters over it (r=4 on q/v, random non-zero weights, so each changes the text). For these
prompts the random weights rarely emit EOS, so most requests generate their full
``max_tokens`` (the JSON's finish reasons show it; nothing relies on it).

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
- Staggered load (16 clients): the plain load, its clients started one request period ÷ 16
  apart (the period measured by the plain cell at 16), so their requests arrive spread out as
  independent users' do instead of in step (closed-loop clients with equal requests all
  finish at the same decode step and all send again at once). Latencies count requests sent
  once every client has started.
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
(``usage_check``). CPU time per token by process is recorded as for the classifier, and the
replica engine's own counters around each measured cell (``engine``: decode steps and their
mean batch, prefills, the engine thread's busy share of the wall time and prefill's share of
that, and its requests' mean wait from submit to prefill and to first token), which tell a
model that is short of work from one that is short of CPU, and the engine's share of TTFT
from what the hops add.

Ratios: Serve aggregate at ``c`` ÷ in-process ``batch{c}`` (target ≥ 0.7 at 4, 8 and 16),
``engine{c}`` ÷ ``batch{c}``, TTFT p50 at 16 ÷ at 1 (target ≤ 4; also for the staggered
load), the mixed and the staggered load ÷ the plain streamed load at 16 (target within 20%
for the mixed one), Serve decode tokens/s ÷ in-process streamed (per-request p50), and the
TTFT overhead (Serve − in-process alone, p50 and p99; under load it includes queueing).
"""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from serve.config import replica_threads

from .baselines import InProcess
from .common import (
    API_KEY,
    ROOT,
    deploy_and_wait,
    ensure_ray,
    free_port,
    generator_ratios,
    keyed_config,
    serve_throughput_mode,
)
from .load import GenCell, _measure_stream
from .workload import (
    ADAPTERS,
    GEN_CONCURRENCY,
    GEN_MODELS,
    MIXED_CONCURRENCY,
    PROMPTS,
    mixed_jobs,
    warmup_streams,
)

GEN_CONFIG = ROOT / "configs" / "serve-llm.yaml"


def generator_model() -> dict[str, Any]:
    """The generator entry of configs/serve-llm.yaml (``writer``) as written there."""
    import yaml

    cfg = yaml.safe_load(GEN_CONFIG.read_text())
    models = cfg["applications"][0]["args"]["models"]
    return copy.deepcopy(next(m for m in models if m["name"] == "writer"))


def app_name() -> str:
    """The Serve application's name in configs/serve-llm.yaml."""
    import yaml

    return str(yaml.safe_load(GEN_CONFIG.read_text())["applications"][0]["name"])


def _gen_threads() -> int:
    from serve.config import ServedModel

    spec = ServedModel.model_validate({**generator_model(), "bundle": "unused"})
    return replica_threads(spec.num_cpus)


# What GeneratorBase.__init__ gives the replica; the in-process reference uses the same.
GEN_THREADS = _gen_threads()


def build_tiny_lm(directory: Path, size: str = "toy") -> Path:
    """A plain HF model directory (no taskray manifest): ``tiny:llama``'s config with the
    ``GEN_MODELS[size]`` overrides and its tokenizer, random weights (seed 0), saved as
    safetensors. ``tiny_model_path`` holds no weights."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.tiny import tiny_model_path

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(source, **GEN_MODELS[size])
    model = AutoModelForCausalLM.from_config(config)
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


def write_generator_config(
    tmp: Path, model_dir: Path, adapters: dict[str, str], port: int
) -> tuple[Path, dict[str, Any]]:
    """``configs/serve-llm.yaml`` reduced to its generator (``writer``, with the benchmark's
    LoRA adapters) and the ingress: this model directory, an API key file, a free loopback
    port, and one replica (autoscaling would only add a replica competing for the same two
    cores)."""
    import yaml

    cfg, app = keyed_config(GEN_CONFIG, tmp, port)
    args = app["args"]
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


class EngineStats:
    """Reads the generator replica's engine counters (one replica is deployed) on an event
    loop of its own. Each measured cell runs in a new ``asyncio.run`` loop, and under Ray's
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` a handle's router runs on the loop it was first
    used from, which the next cell's ``asyncio.run`` would find closed."""

    def __init__(self, app: str) -> None:
        self.app, self.handle = app, None
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _read(self) -> dict[str, Any]:
        from ray import serve

        if self.handle is None:
            self.handle = serve.get_deployment_handle("generator-writer", app_name=self.app)
        return (await self.handle.stats.remote())["engine"]

    async def __call__(self) -> dict[str, Any]:
        future = asyncio.run_coroutine_threadsafe(self._read(), self.loop)
        return await asyncio.wrap_future(future)


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


def measure_generation(smoke: bool, max_tokens: int, size: str = "toy") -> dict[str, Any]:
    """The generator section for the model of ``GEN_MODELS[size]`` (and two LoRA adapters)
    deployed from configs/serve-llm.yaml, streamed over HTTP at each of ``GEN_CONCURRENCY``
    and under the mixed load, with in-process passes before each of those cells."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    timings: dict[str, float] = {}
    per_client = 3 if smoke else 24  # requests per client in each measured cell
    time_limit_s = 8.0 if smoke else 60.0
    # in-process passes over the prompts before each Serve cell (the small model's one pass
    # costs as much time as the toy's three)
    passes = 1 if smoke or size != "toy" else 3
    cells: dict[int, GenCell] = {}
    extra: dict[str, GenCell] = {}  # the mixed and the staggered load
    serve_info: dict[str, Any] = {}
    plain_jobs = [{"prompt": p, "model": "writer", "max_tokens": max_tokens, "stream": True}
                  for p in PROMPTS]  # fmt: skip
    mixed = mixed_jobs(max_tokens)
    app = app_name()

    engine_stats = EngineStats(app)
    with tempfile.TemporaryDirectory(prefix="serve-throughput-gen-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        model_dir = build_tiny_lm(tmp / "tiny-llama", size)
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
            stagger_s = 0.0
            for c in (*GEN_CONCURRENCY, "mixed", "staggered"):
                t0 = time.perf_counter()
                ref.run(passes)
                timings["inprocess_s"] += time.perf_counter() - t0
                s = ref.summary()["streamed"]
                print(
                    f"  in-process generate ({GEN_THREADS} thread, pooled so far): TTFT p50 "
                    f"{s['ttft_p50_ms']:.1f} ms, decode {s['decode_tok_s_p50']:.0f} tok/s",
                    flush=True,
                )
                width = c if isinstance(c, int) else MIXED_CONCURRENCY
                if c == "staggered":  # the plain load, its clients' starts one period apart
                    done = cells[width].ok / width  # requests per client (a time limit may cut)
                    stagger_s = cells[width].seconds / max(done, 1) / width
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
                        engine_stats,
                        stagger_s if c == "staggered" else 0.0,
                    )
                )
                (cells if isinstance(c, int) else extra)[c] = cell
                print(cell.report_line(c if isinstance(c, str) else "stream"), flush=True)
    timings.update({k: serve_info.pop(k) for k in ("ray_start_s", "serve_ready_s")})
    timings["total_s"] = time.perf_counter() - started
    inproc = {**ref.summary(), "passes_per_cell": passes}
    results = {c: cells[c].summary() for c in GEN_CONCURRENCY}
    staggered = {**extra["staggered"].summary(), "stagger_ms": stagger_s * 1000}
    mixed_result = {
        **extra["mixed"].summary(),
        "jobs": len(mixed),
        "models": ["writer", *ADAPTERS],
        "max_tokens": sorted({j["max_tokens"] for j in mixed}),
        "streamed_share": sum(j["stream"] for j in mixed) / len(mixed),
    }
    n_params = sum(p.numel() for p in ref.model.parameters())  # the base model's, adapters excluded
    return {
        "model": "tiny:llama config + tokenizer, random weights (seed 0), plain HF directory",
        "size": size,
        "config_overrides": GEN_MODELS[size],
        "parameters": n_params,
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
        "staggered": staggered,
        "ratios": generator_ratios(results, mixed_result, inproc, staggered),
        "timings_s": timings,
        # 1/5/15-minute load averages: other work on a shared machine shows up here
        "load_average": {
            "before": load_before,
            "after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }
