"""The generator deployment: a causal or seq2seq LM (a bundle or a plain HF model directory)
with LoRA adapters multiplexed per request and token streaming.

A causal LM or an encoder-decoder of the T5 or BART families (BART, mBART, Marian, Pegasus,
M2M100/NLLB, PLBart, MVP, Blenderbot, BlenderbotSmall, LED, BigBird-Pegasus) is driven by one
continuous-batching engine per replica (``actors.engine.ContinuousBatchingEngine``): every
request — streamed or not, any sampling settings, any adapter, greedy, sampled or the beam
search the model's ``generation_config`` asks for — joins the running batch between decode
steps and leaves when it is done. Its queue is bounded (``scheduler`` in the served model's
config): a request past it is refused with ``EngineOverloaded``, which the ingress answers with
503 + Retry-After. Another encoder-decoder family (see ``actors.engine.engine_unsupported``),
or a model whose ``generation_config`` selects a decoding strategy the engine does not run
(assisted decoding, classifier-free guidance, ...), keeps static batches (``@serve.batch``,
equal settings per ``generate`` call) and runs each stream alone.

Adapters are loaded on first use through ``@serve.multiplexed`` (Serve routes requests for an
adapter to replicas that already hold it and evicts the least recently used one past
``max_adapters``); they live as named PEFT adapters on one shared base model, and requests for
different adapters share the engine's batch, each row through its own adapter
(``actors.adapter_rows``).
"""

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ray import serve

from actors.engine import ContinuousBatchingEngine, EngineLimits, engine_unsupported
from actors.generation import Completion, SamplingParams, generate_batch, stream_generate
from serve.config import ServedModel, replica_device

log = logging.getLogger(__name__)


def load_generative(path: str, task_name: str | None, device: str) -> dict[str, Any]:
    """A bundle or a plain HF model directory → task, model, tokenizer, kind."""
    import transformers

    from actors.bundle import MANIFEST, load_bundle
    from actors.modeling import resolve_model_path
    from tasks import get_task

    resolved = Path(resolve_model_path(path))
    if not resolved.is_dir():
        raise FileNotFoundError(f"model directory not found: {resolved}")
    if (resolved / MANIFEST).is_file():
        bundle = load_bundle(resolved, device=device)
        kind = bundle.task.model_kind
        return {"task": bundle.task, "model": bundle.model, "tokenizer": bundle.tokenizer,
                "kind": kind}  # fmt: skip
    from actors.bundle import check_safetensors_only

    check_safetensors_only(resolved)
    # trust_remote_code=False, not the default None: with None, transformers asks on a
    # terminal whether to run a directory's own code, and runs it on "y".
    no_code = {"trust_remote_code": False}
    config = transformers.AutoConfig.from_pretrained(str(resolved), **no_code)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(str(resolved), use_safetensors=True, **no_code).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(resolved), **no_code)
    task = get_task(task_name or "generation")
    return {"task": task, "model": model, "tokenizer": tokenizer,
            "kind": "seq2seq_lm" if seq2seq else "causal_lm"}  # fmt: skip


class _AdapterRef:
    """What ``@serve.multiplexed`` caches per adapter; Serve calls ``__del__`` on eviction,
    which removes the adapter's weights from the shared base."""

    def __init__(self, owner: "GeneratorBase", name: str) -> None:
        self.owner, self.name = owner, name

    def __del__(self) -> None:
        # Serve calls this on eviction and Python calls it again at garbage collection, maybe
        # after the adapter was loaded anew under the same name: only the first call unloads.
        owner, self.owner = getattr(self, "owner", None), None
        if owner is not None:
            owner._unload_adapter(self.name)


class GeneratorBase:
    """Holds the model; subclasses created by ``generator_class`` add the Serve decorators."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = ServedModel.model_validate(spec)
        device = replica_device(self.spec)
        from actors.bundle import check_safetensors_only

        # Adapters are loaded on first use; refuse pickled ones now, at deploy time.
        for adapter in self.spec.adapters.values():
            check_safetensors_only(adapter)
        loaded = load_generative(self.spec.bundle, self.spec.task, device)
        self.task, self.model, self.tokenizer = loaded["task"], loaded["model"], loaded["tokenizer"]
        self.seq2seq = loaded["kind"] == "seq2seq_lm"
        self.engine: ContinuousBatchingEngine | None = None
        static = engine_unsupported(self.model)
        if static is None:
            try:
                self.engine = ContinuousBatchingEngine(
                    self.model, self.tokenizer, self._limits(self.spec.scheduler.model_dump()),
                    prepare=self._prepare_adapters,
                )  # fmt: skip
            except ValueError as err:  # what it found only once built (its processors)
                static = str(err)
        if static is not None:
            log.warning("%s: static batches, not continuous batching: %s", self.spec.name, static)
        # One model step at a time per replica: adapters are added to and removed from the
        # shared base under this lock (the engine holds it during each step).
        self.lock: Any = self.engine.lock if self.engine is not None else threading.Lock()
        self.loaded_adapters: list[str] = []
        self.batch_sizes: Counter[int] = Counter()
        self.defaults = self.spec.generation
        self.stream_interval_s = self.spec.scheduler.stream_interval_s
        self.stream_messages_per_s = self.spec.scheduler.stream_messages_per_s
        self.open_streams = 0
        self.generate.set_max_batch_size(self.spec.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    @staticmethod
    def _limits(scheduler: dict[str, Any]) -> EngineLimits:
        stream_only = ("stream_interval_s", "stream_messages_per_s")
        return EngineLimits(**{k: v for k, v in scheduler.items() if k not in stream_only})

    def stream_interval(self) -> float:
        """Seconds between one stream's text items: ``scheduler.stream_interval_s``, widened
        so that this replica's open streams together send at most
        ``scheduler.stream_messages_per_s`` items a second. Each item costs about the same CPU
        on its way (replica → ingress → proxy → client) whatever text it carries, so a fixed
        per-stream interval makes that cost grow with the number of streams until it starves
        the model's own steps; a replica-wide budget keeps it bounded (more text per item as
        streams are added; the first piece of each stream still goes out at once)."""
        if self.stream_messages_per_s <= 0:
            return self.stream_interval_s
        return max(self.stream_interval_s, self.open_streams / self.stream_messages_per_s)

    # ----- adapters -------------------------------------------------------------------------
    def _load_adapter(self, name: str) -> None:
        from actors.bundle import check_safetensors_only

        check_safetensors_only(self.spec.adapters[name])  # PEFT would fall back to a pickle
        with self.lock:
            if name not in self.loaded_adapters:
                self._attach(name)

    def _attach(self, name: str) -> None:
        """Add an adapter to the shared base (caller holds ``lock``)."""
        from peft import PeftModel

        path = self.spec.adapters[name]
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        self.model.eval()
        self.loaded_adapters.append(name)
        if self.engine is not None:
            self.engine.model = self.model

    def _unload_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.loaded_adapters:
                return
            self.loaded_adapters.remove(name)
            if self.engine is not None:  # its kept prompt K/V go with it
                self.engine.forget_adapter(name)
            if self.loaded_adapters:
                self.model.delete_adapter(name)
            else:  # the last one: back to the plain base (PEFT can't hold zero adapters)
                self.model = self.model.unload()
            if self.engine is not None:
                self.engine.model = self.model

    def _prepare_adapters(self, names: set[str]) -> None:
        """Called by the engine (under ``lock``) before a step: an adapter that Serve evicted
        while a request of its own was still queued or running is loaded again."""
        for name in sorted(names - set(self.loaded_adapters)):
            self._attach(name)

    async def _adapter_for_request(self) -> str | None:
        name = serve.get_multiplexed_model_id()
        if not name or name == self.spec.name:
            return None
        await self.get_adapter(name)
        return name

    def _run(self, adapter: str | None, fn: Any) -> Any:
        """Call ``fn`` with the right adapter active (caller holds the lock)."""
        import contextlib

        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if adapter is None:
                ctx = self.model.disable_adapter()
            else:
                if adapter not in self.loaded_adapters:  # evicted meanwhile: reload
                    self._attach(adapter)
                self.model.set_adapter(adapter)
                ctx = contextlib.nullcontext()
            with ctx:
                return fn()
        if adapter is not None:
            raise RuntimeError(f"adapter '{adapter}' is not loaded")
        return fn()

    # ----- info -----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of this model."""
        return {
            "id": self.spec.name,
            "task": self.task.name,
            "adapters": sorted(self.spec.adapters),
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
        }

    def ready(self) -> bool:
        """The replica exists only once its model is loaded."""
        return True

    def stats(self) -> dict[str, Any]:
        """Batch sizes run (prefills that joined the running batch, under the engine), adapters
        held and, under the engine, its queue and batch figures."""
        out: dict[str, Any] = {"adapters": list(self.loaded_adapters)}
        if self.engine is None:
            return {"batch_sizes": dict(self.batch_sizes), **out}
        engine = self.engine.stats()
        return {"batch_sizes": engine["prefill_batch_sizes"], "engine": engine, **out}

    def check_health(self) -> None:
        """Serve's periodic probe."""
        if self.model is None:
            raise RuntimeError("model not loaded")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot settings from the Serve config's ``user_config``: batching and defaults."""
        if "max_batch_size" in user_config:
            self.generate.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.generate.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "generation" in user_config:
            self.defaults = self.defaults.model_copy(update=user_config["generation"])
        if "scheduler" in user_config and self.engine is not None:
            from serve.config import SchedulerArgs

            merged = {**self.spec.scheduler.model_dump(), **user_config["scheduler"]}
            checked = SchedulerArgs.model_validate(merged)
            if checked.max_running < self.engine.rows_per_request:
                raise ValueError(
                    f"scheduler.max_running={checked.max_running}: the model searches "
                    f"{self.engine.rows_per_request} beams, each a row of the batch; give at "
                    "least that many"
                )
            self.engine.limits = self._limits(checked.model_dump())
            self.stream_interval_s = checked.stream_interval_s
            self.stream_messages_per_s = checked.stream_messages_per_s

    # ----- generation -----------------------------------------------------------------------
    def _submit(self, prompt: str, params: dict[str, Any], adapter: str | None, sink: Any) -> int:
        """Queue a request on the engine; its events are handed to ``sink`` on this replica's
        event loop (one hop per engine step, however many requests it served)."""
        assert self.engine is not None
        if self.engine.dispatcher is None:
            self.engine.dispatcher = asyncio.get_running_loop().call_soon_threadsafe
        return self.engine.submit(prompt, SamplingParams(**params), adapter, sink)

    async def complete(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        """One prompt → one completion (it joins the running batch; without the engine,
        concurrent calls are batched by ``generate``)."""
        adapter = await self._adapter_for_request()
        if self.engine is not None:
            result: Any = asyncio.get_running_loop().create_future()

            def sink(kind: str, payload: Any) -> None:
                if result.done():
                    return
                if kind == "done":
                    result.set_result(payload)
                elif kind == "error":
                    result.set_exception(payload)

            rid = self._submit(prompt, params, adapter, sink)
            try:
                return (await result).__dict__
            finally:
                self.engine.cancel(rid)  # a no-op once done; frees the slot if we were cancelled
        result = await self.generate((prompt, SamplingParams(**params), adapter))
        if isinstance(result, Exception):  # this prompt's own failure (see generate)
            raise result
        return result.__dict__

    async def generate(self, items: list[tuple[str, SamplingParams, str | None]]) -> list[Any]:
        """Batched: items with the same params and adapter share one ``generate`` call."""
        self.batch_sizes[len(items)] += 1
        groups: dict[tuple[SamplingParams, str | None], list[int]] = {}
        for i, (_, params, adapter) in enumerate(items):
            groups.setdefault((params, adapter), []).append(i)
        out: list[Any] = [None] * len(items)

        def work() -> None:
            from serve.batching import isolate_failures

            with self.lock:
                for (params, adapter), idx in groups.items():
                    prompts = [items[i][0] for i in idx]
                    # A prompt that makes the model raise fails alone, not its whole batch.
                    done = isolate_failures(
                        lambda chunk, a=adapter, s=params: self._run(
                            a,
                            lambda: generate_batch(
                                self.model, self.tokenizer, chunk, s, self.seq2seq
                            ),
                        ),
                        prompts,
                    )
                    for i, completion in zip(idx, done, strict=True):
                        out[i] = completion

        await asyncio.to_thread(work)
        return out

    async def stream(self, prompt: str, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """``{"text": piece}`` items as the text is generated; the last item carries
        ``"done"`` (the ``Completion``), with the last ``"text"`` when there is one. A refused
        request (a full queue, a bad prompt) raises before the first item. Pieces that arrive
        while the caller is still reading the previous one are sent as one (fewer, larger
        messages under load). Closing the stream (a client that went away) frees the
        request's slot at the engine's next step."""
        adapter = await self._adapter_for_request()
        if self.engine is not None:
            tokens = TokenStream(self.stream_interval)
            rid = self._submit(prompt, params, adapter, tokens.sink)
            self.open_streams += 1
            try:
                async for item in tokens.items():
                    yield item
            finally:
                self.open_streams -= 1
                self.engine.cancel(rid)
            return
        sampling = SamplingParams(**params)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sentinel = object()

        def produce() -> None:
            try:
                with self.lock:
                    pieces = self._run(
                        adapter,
                        lambda: list(
                            _forward(
                                stream_generate(
                                    self.model, self.tokenizer, prompt, sampling, self.seq2seq
                                ),
                                loop,
                                queue,
                            )
                        ),
                    )
                del pieces
            except Exception as err:
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, sentinel)

        task = loop.run_in_executor(None, produce)
        while True:
            item = await queue.get()
            if item is sentinel:
                break
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Completion):
                yield {"done": item.__dict__}
            else:
                yield {"text": item}
        await task


class TokenStream:
    """One engine request's events, read as stream items at most one text item per
    interval: the first piece goes out at once; text decoded while the interval since the
    previous item runs goes out joined when it ends (every item costs a message through Ray to
    the ingress and on to the proxy, which on a busy CPU costs more than the tokens
    themselves); the completion (or its error) goes out at once, in one item with the text
    still held (one message, not two). ``sink`` runs on the event
    loop (the engine's dispatcher) and wakes the reader only when there is something to send,
    not at every decode step.

    ``interval_s`` is a number, or a callable read after each item (the replica widens the
    interval as more streams share its message budget, see ``GeneratorBase.stream_interval``).
    """

    def __init__(self, interval_s: float | Callable[[], float]) -> None:
        self.loop = asyncio.get_running_loop()
        self.interval_s = interval_s if callable(interval_s) else (lambda: interval_s)
        self.events: list[tuple[str, Any]] = []
        self.wake = asyncio.Event()
        self.hold_until = float("-inf")
        self.timer: asyncio.TimerHandle | None = None

    def sink(self, kind: str, payload: Any) -> None:
        """Engine events (on the loop)."""
        self.events.append((kind, payload))
        if kind != "text" or self.loop.time() >= self.hold_until:
            self.wake.set()
        elif self.timer is None:
            self.timer = self.loop.call_at(self.hold_until, self._release)

    def _release(self) -> None:
        self.timer = None
        if self.events:
            self.wake.set()

    async def items(self) -> AsyncIterator[dict[str, Any]]:
        """``{"text": ...}`` items; the last one carries ``"done"`` (the Completion's
        fields), with ``"text"`` too when text was still held. An error is raised."""
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                events, self.events = self.events, []
                text = "".join(p for k, p in events if k == "text")
                ends = {k: p for k, p in events if k in ("done", "error")}
                if "done" in ends:
                    yield {**({"text": text} if text else {}), "done": ends["done"].__dict__}
                    return
                if text:
                    yield {"text": text}
                    self.hold_until = self.loop.time() + self.interval_s()
                if "error" in ends:
                    raise ends["error"]
        finally:
            if self.timer is not None:
                self.timer.cancel()


def _forward(pieces: Any, loop: Any, queue: asyncio.Queue) -> Any:
    """Hand each streamed piece to the event loop as soon as it exists."""
    for piece in pieces:
        loop.call_soon_threadsafe(queue.put_nowait, piece)
        yield None


def generator_class(max_adapters: int) -> Any:
    """The Serve deployment class, with ``max_adapters`` adapters per replica."""

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    class Generator(GeneratorBase):
        """A generative model behind the ingress (see the module docstring)."""

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, name: str) -> _AdapterRef:
            """Load an adapter on first use (Serve keeps the ``max_adapters`` most recent)."""
            await asyncio.to_thread(self._load_adapter, name)
            return _AdapterRef(self, name)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def generate(self, items: list[tuple[str, SamplingParams, str | None]]) -> list:
            """Batched generation (see ``GeneratorBase.generate``)."""
            return await GeneratorBase.generate(self, items)

    return Generator
