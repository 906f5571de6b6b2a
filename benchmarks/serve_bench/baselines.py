"""What taskray's Serve app is measured against, in the same run: for the classifier, a FastAPI +
uvicorn server around a ``transformers`` pipeline in a subprocess (what a user would otherwise
write); for the generator, the same weights in this process (``InProcess``: ``generate`` with a
streamer, plain, statically batched, and taskray's engine without Serve)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from .common import ENTRY, ROOT, decode_rate, free_port, pct, stream_figures
from .load import Target, has_label
from .workload import GEN_CONCURRENCY, MIXED_CONCURRENCY, PROMPTS, job_key


# ----- the classifier's baseline: FastAPI + uvicorn around a transformers pipeline -------------
class ClassifyBody(BaseModel):
    """The baseline server's request body."""

    text: str


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
def baseline_server(
    bundle: Path, log_path: Path, threads: int, timeout_s: float = 180.0
) -> Iterator[Target]:
    """Run the baseline server (the CLI's ``--baseline-server``) in a subprocess with ``threads``
    torch threads, poll ``/health`` until it answers, yield its target; terminate it however
    the block ends."""
    port = free_port()
    cmd = [sys.executable, str(ENTRY), "--baseline-server"]
    cmd += ["--bundle", str(bundle), "--port", str(port), "--threads", str(threads)]
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


# ----- the generator's baseline: the same weights in this process ------------------------------
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
        # (tokens, wall seconds, the engine thread's CPU seconds) per closed loop
        self.engined: dict[int, list[Loop]] = {w: [] for w in self.widths}
        self.engine_mismatches = 0
        # the mixed load on the engine in process (a PEFT base with both adapters, built once)
        self.model_dir, self.adapters = model_dir, adapters
        self.mixed_jobs: list[Job] = [
            (j["prompt"], None if j["model"] == "writer" else j["model"], j["max_tokens"])
            for j in jobs
        ]
        self.multi: Any = None
        self.mixed_engined: list[Loop] = []
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

    def _engine_loop(self, width: int, n_requests: int) -> Loop:
        """taskray's continuous-batching engine in this process, no Serve: ``width`` closed-loop
        clients (each submits its next prompt when its previous one is done) → tokens, s."""
        jobs: list[Job] = [(p, None, self.max_tokens) for p in self.prompts]
        return self._run_engine(self.model, jobs, width, n_requests)

    def _mixed_engine_loop(self, width: int, n_requests: int) -> Loop:
        """The mixed load's jobs (base and adapters, two lengths) on the engine in this
        process, over one base holding both adapters, as a Serve replica holds them: what
        that work costs without Serve."""
        if self.multi is None:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(str(self.model_dir), use_safetensors=True)
            names = list(self.adapters)
            multi = PeftModel.from_pretrained(base, self.adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                multi.load_adapter(self.adapters[name], adapter_name=name)
            self.multi = multi.eval()
        return self._run_engine(self.multi, self.mixed_jobs, width, n_requests)

    def _run_engine(self, model: Any, jobs: list[Job], width: int, n_requests: int
                    ) -> Loop:  # fmt: skip
        """``engine_closed_loop`` on a fresh engine over ``model``, each text checked against
        the greedy reference; with the engine thread's CPU seconds (which include the
        closed loop's own callbacks, run on that thread: a little more than the model's)."""
        from actors.engine import ContinuousBatchingEngine

        def check(job: Job, text: str | None) -> None:
            prompt, adapter, max_tokens = job
            ref = self.reference[(prompt, adapter or "writer", max_tokens)]["text"]
            self.engine_mismatches += text != ref

        engine = ContinuousBatchingEngine(model, self.tok)
        try:
            tokens, seconds = engine_closed_loop(engine, jobs, width, n_requests, check)
        finally:
            engine.close()
        return tokens, seconds, engine.stats()["thread_cpu_s"]

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
                width = MIXED_CONCURRENCY
                self.mixed_engined.append(self._mixed_engine_loop(width, 2 * width))
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
            cpu = [c for *_, c in loops]
            out[f"engine{w}"] = {
                "loops": len(loops),
                "aggregate_tok_s": sum(n for n, *_ in loops) / sum(s for _, s, _ in loops),
                "text_mismatches": self.engine_mismatches,
                "cpu_ms_per_token": None if None in cpu
                else 1000.0 * sum(cpu) / sum(n for n, *_ in loops),
            }  # fmt: skip
        if self.mixed_engined:
            runs = self.mixed_engined
            out[f"engine_mixed{MIXED_CONCURRENCY}"] = {
                "loops": len(runs),
                "aggregate_tok_s": sum(n for n, *_ in runs) / sum(s for _, s, _ in runs),
                "text_mismatches": self.engine_mismatches,
            }
        return out


Job = tuple[str, str | None, int]
"""One engine request: (prompt, adapter or None, max new tokens)."""
Loop = tuple[int, float, float | None]
"""One closed loop on the engine: tokens, wall seconds, the engine thread's CPU seconds."""


def engine_closed_loop(engine: Any, jobs: list[Job], width: int, n_requests: int,
                       check: Callable[[Job, str | None], None],
                       ) -> tuple[int, float]:  # fmt: skip
    """``width`` closed-loop clients on ``engine`` (each submits its next job, cycling
    ``jobs``, when its previous one is done), ``n_requests`` greedy requests in all →
    (tokens generated, wall seconds). ``check(job, text)`` sees each completion's text (None
    for a request that failed)."""
    import threading

    from actors.generation import SamplingParams

    lock, finished = threading.Lock(), threading.Event()
    state = {"issued": 0, "done": 0, "tokens": 0}

    def submit() -> None:
        job = jobs[state["issued"] % len(jobs)]
        state["issued"] += 1
        prompt, adapter, max_tokens = job
        engine.submit(prompt, SamplingParams(max_new_tokens=max_tokens), adapter,
                      lambda k, p, q=job: on_event(k, p, q))  # fmt: skip

    def on_event(kind: str, payload: Any, job: Job) -> None:
        if kind == "text":
            return
        with lock:
            state["done"] += 1
            if kind == "done":
                state["tokens"] += payload.completion_tokens
            check(job, payload.text if kind == "done" else None)
            if state["issued"] < n_requests:
                submit()
            elif state["done"] == n_requests:
                finished.set()

    t0 = time.perf_counter()
    with lock:
        for _ in range(width):
            submit()
    if not finished.wait(600):
        raise TimeoutError(f"engine at width {width}: {n_requests} requests not done in 600 s")
    return state["tokens"], time.perf_counter() - t0
