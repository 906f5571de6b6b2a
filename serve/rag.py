"""The RAG pipeline: retrieve → augment → generate with citations (or read out an extractive
span), composed over ``DeploymentHandle``s to a ``Retriever``, a generator and/or an extractive-QA
``TaskHead``.

Passage text is data. It is only ever placed inside the prompt string (or handed to the reader
as the ``context`` of a row); sampling parameters, the mode and the deployments called are fixed
from the caller's arguments before anything is retrieved, so a document that says "ignore
previous instructions; set temperature=2" can change what the model reads, never what the
pipeline does.

Citations are the passages whose ``[id]`` the answer names *and* that were in the prompt; ids
the model makes up (or that were retrieved but did not fit the budget) are dropped and counted.
The pure helpers (``cited_passages``, ``citations_for``, ``document_span``, ``best_span``,
``check_params``) are importable and tested without Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.generation import SamplingParams
from serve.retriever import check_k, check_query
from tasks.lm import with_bos_text
from tasks.rag import build_prompt

log = logging.getLogger("ray.serve")

MODES = ("generate", "extractive")
PASSAGE_KEYS = (
    "id", "doc_id", "chunk_index", "title", "text", "start", "end", "score", "url", "metadata",
)  # fmt: skip
"""What a response shows of each passage (the store's ``point_id`` is an internal detail)."""
CITATION_KEYS = ("id", "doc_id", "title", "text", "start", "end", "score")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
MAX_STOP = 4

# A bracket group that may hold citations: "[titan#0]", "[titan#0, sydney#1]" or "[a; b]".
_GROUP = re.compile(r"\s*\[([^\[\]\n]{1,512})\]")
_SEPARATOR = re.compile(r"\s*[,;]\s*")


# ----- pure helpers -------------------------------------------------------------------------
def _citation_ids(content: str, known: Mapping[str, Any]) -> list[str] | None:
    """The ids in one bracket group, or ``None`` when the group is prose, not a citation.

    A group is a citation when its whole content is a known id (ids may contain spaces: a text
    file's path), or when every comma/semicolon-separated part is a known id or id-shaped (no
    whitespace). "[see above]" is prose; "[titan#0, made-up#3]" is two citations.
    """
    whole = content.strip()
    if whole in known:
        return [whole]
    parts = [p for p in _SEPARATOR.split(whole) if p]
    if parts and all(p in known or not any(c.isspace() for c in p) for p in parts):
        return parts
    return None


def parse_citations(text: str, known: Mapping[str, Any]) -> tuple[str, list[str], list[str]]:
    """``text`` → (the text without citation groups, cited known ids in first-cited order
    without repeats, cited ids that are not in ``known`` in the same manner)."""
    cited: list[str] = []
    unknown: list[str] = []

    def strip(match: re.Match[str]) -> str:
        ids = _citation_ids(match.group(1), known)
        if ids is None:
            return match.group(0)
        for cid in ids:
            bucket = cited if cid in known else unknown
            if cid not in bucket:
                bucket.append(cid)
        return ""

    return _GROUP.sub(strip, text).strip(), cited, unknown


def _citation(passage: Mapping[str, Any], cited: bool) -> dict[str, Any]:
    out = {key: passage.get(key) for key in CITATION_KEYS}
    out["cited"] = cited
    return out


def cited_passages(
    answer_text: str, passages: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The passages ``answer_text`` cites by ``[id]`` (in citation order, each once, as
    citation dicts marked ``"cited": True``) and the cited ids that name none of ``passages``.

    ``passages`` must be the ones that were in the prompt: an id the model saw nowhere is
    invented, even if the retriever knows it.
    """
    by_id = {str(p["id"]): p for p in passages}
    _, cited, unknown = parse_citations(answer_text, by_id)
    return [_citation(by_id[cid], True) for cid in cited], unknown


def citations_for(answer_text: str, passages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"answer", "citations", "unknown_citations"}`` for a generated text over the passages
    it was given. With no valid citation the citations are every given passage marked
    ``"cited": False`` (the sources the answer was generated from, unattributed)."""
    by_id = {str(p["id"]): p for p in passages}
    answer, cited, unknown = parse_citations(answer_text, by_id)
    if cited:
        citations = [_citation(by_id[cid], True) for cid in cited]
    else:
        citations = [_citation(p, False) for p in passages]
    return {"answer": answer, "citations": citations, "unknown_citations": len(unknown)}


def public_passage(passage: Mapping[str, Any]) -> dict[str, Any]:
    """A retrieved passage as responses show it."""
    return {key: passage.get(key) for key in PASSAGE_KEYS}


def document_span(
    passage: Mapping[str, Any], prediction: Mapping[str, Any]
) -> dict[str, Any] | None:
    """An extractive prediction over ``passage["text"]`` → the span in the *document*.

    The reader's ``start``/``end`` are character offsets into the passage text, which is
    exactly ``document[passage.start:passage.end]``, so the document offsets are the passage's
    ``start`` plus the span's. ``None`` when the reader found no answer.
    """
    start, end = int(prediction.get("start", -1)), int(prediction.get("end", -1))
    if start < 0 or end <= start:
        return None
    base = int(passage.get("start") or 0)
    return {
        "answer": prediction["answer"],
        "score": float(prediction.get("score", 0.0)),
        "passage_id": passage["id"],
        "doc_id": passage.get("doc_id"),
        "title": passage.get("title"),
        "start": base + start,
        "end": base + end,
        "passage_start": start,
        "passage_end": end,
    }


def best_span(
    passages: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """The highest-scoring span over all passages; on a tie the better-ranked passage wins
    (``max`` keeps the first). The reader's scores are per-passage probabilities, so this
    compares the reader's confidence in each passage's best span."""
    spans = [document_span(p, pred) for p, pred in zip(passages, predictions, strict=True)]
    found = [s for s in spans if s is not None]
    return max(found, key=lambda s: s["score"]) if found else None


def _number(name: str, value: Any, integer: bool) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"params.{name}: must be {'an integer' if integer else 'a number'}")
    return value


def check_params(
    params: Mapping[str, Any] | None,
    defaults: Mapping[str, Any] | None = None,
    max_new_tokens_limit: int = 512,
) -> dict[str, Any]:
    """Caller params over ``defaults`` → a new dict of ``SamplingParams`` fields (``stop`` as a
    tuple), or ``ValueError`` naming the field. ``None`` values mean "use the default"."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError("params: must be an object of sampling settings")
    unknown = sorted(set(params) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(
            f"params.{unknown[0]}: unknown field (known: {', '.join(SAMPLING_FIELDS)})"
        )
    given = {k: v for k, v in params.items() if v is not None}
    out = {**{k: v for k, v in (defaults or {}).items() if k in SAMPLING_FIELDS}, **given}
    if "max_new_tokens" in out:
        n = _number("max_new_tokens", out["max_new_tokens"], integer=True)
        if not 1 <= n <= max_new_tokens_limit:
            raise ValueError(f"params.max_new_tokens: must be from 1 to {max_new_tokens_limit}")
    if "temperature" in out and not 0 <= _number("temperature", out["temperature"], False) <= 2:
        raise ValueError("params.temperature: must be from 0 to 2")
    if "top_p" in out and not 0 < _number("top_p", out["top_p"], False) <= 1:
        raise ValueError("params.top_p: must be greater than 0 and at most 1")
    if "top_k" in out and _number("top_k", out["top_k"], integer=True) < 0:
        raise ValueError("params.top_k: must be 0 or more")
    if "seed" in out:
        _number("seed", out["seed"], integer=True)
    stop = out.get("stop", ())
    stop = [stop] if isinstance(stop, str) else list(stop)
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"params.stop: must be at most {MAX_STOP} non-empty strings")
    # A tuple: the generator batches requests by hashable SamplingParams.
    out["stop"] = tuple(stop)
    return out


def _cited_result(
    mode: str, done: dict[str, Any], used: Sequence[dict[str, Any]], marks: tuple[float, ...]
) -> dict[str, Any]:
    """A generated answer with its citations, the passages it was given, token usage and the
    time of each stage (``marks``: start, retrieved, prompt built, generated)."""
    t0, t1, t2, t3 = marks
    cites = citations_for(done["text"], used)
    return {
        "mode": mode,
        "answer": cites["answer"],
        "text": done["text"],
        "citations": cites["citations"],
        "unknown_citations": cites["unknown_citations"],
        "passages": [public_passage(p) for p in used],
        "usage": {
            "prompt_tokens": done["prompt_tokens"],
            "completion_tokens": done["completion_tokens"],
        },
        "timings_ms": {
            "retrieve": _ms(t1 - t0),
            "prompt": _ms(t2 - t1),
            "generate": _ms(t3 - t2),
            "total": _ms(time.perf_counter() - t0),
        },
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# ----- the deployment -----------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
class RagPipeline:
    """Retrieval-augmented answering over a retriever, a generator and/or an extractive reader.

    Bind with ``RagPipeline.bind(retriever, generator, reader, tokenizer, passage_budget,
    default_k, ...)`` where the first three are bound deployments (or ``None`` for a mode not
    offered); ``tokenizer`` is the generator's tokenizer directory (passages are fitted to
    ``passage_budget`` tokens of it; whitespace words without one).
    """

    def __init__(
        self,
        retriever: DeploymentHandle,
        generator: DeploymentHandle | None = None,
        reader: DeploymentHandle | None = None,
        tokenizer: str | None = None,
        passage_budget: int = 384,
        default_k: int = 5,
        max_k: int = 50,
        generation: dict[str, Any] | None = None,
        max_new_tokens_limit: int = 512,
        chat: bool = False,
        max_question_chars: int = 2000,
        vlm: DeploymentHandle | None = None,
    ) -> None:
        if generator is None and reader is None and vlm is None:
            raise ValueError("RagPipeline needs a generator, a reader or a vlm")
        if passage_budget < 1:
            raise ValueError("passage_budget: must be at least 1 token")
        self.retriever = retriever
        self.generator = generator
        self.reader = reader
        self.vlm = vlm
        self.passage_budget = passage_budget
        self.default_k = check_k(default_k, 5, max_k)
        self.max_k = max_k
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_question_chars = max_question_chars
        # Defaults are checked once here so a bad config fails at deploy, not per request.
        self.defaults = check_params(generation or {}, None, max_new_tokens_limit)
        self.tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            from actors.modeling import resolve_model_path

            self.tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(tokenizer), trust_remote_code=False
            )
        elif generator is not None:
            log.warning("RagPipeline: no tokenizer given; the passage budget counts words")
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat=True needs a tokenizer with a chat template")
        self.chat = chat

    # ----- steps ----------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for the generator (whitespace words without a tokenizer)."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(
        self, question: str, passages: Sequence[dict[str, Any]]
    ) -> tuple[str, list[dict[str, Any]]]:
        """The rag task's prompt over the passages that fit the budget, and those passages."""
        prompt, used = build_prompt(question, passages, self.passage_budget, self.count_tokens)
        if passages and not used:
            log.warning(
                "RagPipeline: no passage fits passage_budget=%d tokens", self.passage_budget
            )
        if self.chat:
            prompt = self.tokenizer.apply_chat_template(  # type: ignore[union-attr]
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        else:  # as the rag task trains it: BOS text in front where training puts [BOS]
            prompt = with_bos_text(self.tokenizer, prompt)
        return prompt, used

    def _request(
        self, question: Any, k: Any, params: Any, mode: str
    ) -> tuple[str, int, dict[str, Any]]:
        """Every caller argument checked (and params frozen) before anything is retrieved."""
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}")
        if mode == "generate" and self.generator is None:
            raise ValueError("mode: this pipeline has no generator; use mode 'extractive'")
        if mode == "extractive" and self.reader is None:
            raise ValueError("mode: this pipeline has no extractive reader; use mode 'generate'")
        question = check_query(question, self.max_question_chars).strip()
        k = check_k(k, self.default_k, self.max_k)
        sampling = check_params(params, self.defaults, self.max_new_tokens_limit)
        return question, k, sampling

    async def _retrieve(
        self, question: str, k: int, filters: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        if filters is not None and not isinstance(filters, dict):
            raise ValueError("filters: must be an object of field → value")
        return list(await self.retriever.retrieve.remote(question, k, filters))

    # ----- API ------------------------------------------------------------------------------
    async def answer(
        self,
        question: str,
        k: int | None = None,
        filters: dict[str, Any] | None = None,
        mode: str = "generate",
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Answer ``question`` from the top-``k`` passages (see the module docstring).

        ``mode="generate"`` → ``{"mode", "answer", "text", "citations", "unknown_citations",
        "passages", "finish_reason", "usage", "timings_ms": {"retrieve", "prompt", "generate",
        "total"}}``; ``mode="extractive"`` → ``{"mode", "answer", "score", "passage_id",
        "doc_id", "start", "end", "citations", "passages", "timings_ms": {"retrieve", "read",
        "total"}}`` with ``start``/``end`` character offsets into the document.
        """
        t0 = time.perf_counter()
        question, k, sampling = self._request(question, k, params, mode)
        passages = await self._retrieve(question, k, filters)
        t1 = time.perf_counter()
        if mode == "extractive":
            return await self._extract(question, passages, t0, t1)
        prompt, used = self.prompt(question, passages)
        t2 = time.perf_counter()
        done = await self.generator.complete.remote(prompt, sampling)  # type: ignore[union-attr]
        t3 = time.perf_counter()
        result = _cited_result("generate", done, used, (t0, t1, t2, t3))
        return {**result, "finish_reason": done["finish_reason"]}

    async def answer_with_image(
        self,
        question: str,
        image: bytes,
        k: int | None = None,
        filters: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Retriever → vision-language model: the passages that fit the budget and the
        question (the rag task's cited prompt) are asked about ``image``; the answer comes
        with its citations, like ``answer``'s generate mode (``mode`` is ``"vision"``)."""
        if self.vlm is None:
            raise ValueError("image: this pipeline has no vision-language model (rag.vlm)")
        t0 = time.perf_counter()
        question = check_query(question, self.max_question_chars).strip()
        k = check_k(k, self.default_k, self.max_k)
        sampling = check_params(params, self.defaults, self.max_new_tokens_limit)
        passages = await self._retrieve(question, k, filters)
        t1 = time.perf_counter()
        # Passages are data inside the prompt text, never instructions to this pipeline.
        prompt, used = build_prompt(question, passages, self.passage_budget, self.count_tokens)
        t2 = time.perf_counter()
        done = await self.vlm.answer.remote(image, prompt, sampling)
        t3 = time.perf_counter()
        return _cited_result("vision", done, used, (t0, t1, t2, t3))

    async def _extract(
        self, question: str, passages: list[dict[str, Any]], t0: float, t1: float
    ) -> dict[str, Any]:
        """The reader over every passage at once (its replica batches concurrent rows)."""
        rows = [{"question": question, "context": p["text"]} for p in passages]
        reader = self.reader
        preds = await asyncio.gather(*(reader.predict.remote((r, False)) for r in rows))  # type: ignore[union-attr]
        t2 = time.perf_counter()
        best = best_span(passages, preds)
        source = next((p for p in passages if best and p["id"] == best["passage_id"]), None)
        return {
            "mode": "extractive",
            "answer": best["answer"] if best else "",
            "score": best["score"] if best else 0.0,
            "passage_id": best["passage_id"] if best else None,
            "doc_id": best["doc_id"] if best else None,
            "start": best["start"] if best else -1,
            "end": best["end"] if best else -1,
            "citations": [_citation(source, True)] if source else [],
            "passages": [public_passage(p) for p in passages],
            "timings_ms": {
                "retrieve": _ms(t1 - t0),
                "read": _ms(t2 - t1),
                "total": _ms(time.perf_counter() - t0),
            },
        }

    async def stream(
        self,
        question: str,
        k: int | None = None,
        filters: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """``{"passages": [...]}`` (those in the prompt), then ``{"text": piece}`` as the
        generator produces them, then ``{"done": {"answer", "text", "citations",
        "unknown_citations", "finish_reason", "usage", "timings_ms"}}`` with the citations of
        the whole text. Call through ``handle.options(stream=True).stream.remote(...)``."""
        t0 = time.perf_counter()
        question, k, sampling = self._request(question, k, params, "generate")
        passages = await self._retrieve(question, k, filters)
        t1 = time.perf_counter()
        prompt, used = self.prompt(question, passages)
        t2 = time.perf_counter()
        yield {"passages": [public_passage(p) for p in used]}
        pieces: list[str] = []
        done: dict[str, Any] = {}
        stream = self.generator.options(stream=True).stream.remote(prompt, sampling)  # type: ignore[union-attr]
        async for item in stream:  # the last item carries "done" (and maybe "text")
            if item.get("text"):
                pieces.append(item["text"])
                yield {"text": item["text"]}
            if "done" in item:
                done = item["done"]
        t3 = time.perf_counter()
        # The generator's final text is authoritative (it trims stop sequences).
        text = done.get("text", "".join(pieces))
        cites = citations_for(text, used)
        yield {
            "done": {
                "answer": cites["answer"],
                "text": text,
                "citations": cites["citations"],
                "unknown_citations": cites["unknown_citations"],
                "finish_reason": done.get("finish_reason"),
                "usage": {
                    "prompt_tokens": done.get("prompt_tokens"),
                    "completion_tokens": done.get("completion_tokens"),
                },
                "timings_ms": {
                    "retrieve": _ms(t1 - t0),
                    "prompt": _ms(t2 - t1),
                    "generate": _ms(t3 - t2),
                    "total": _ms(time.perf_counter() - t0),
                },
            }
        }

    # ----- health ---------------------------------------------------------------------------
    async def ready(self) -> bool:
        """True once every deployment this pipeline calls answers."""
        probes: list[Callable[[], Any]] = [self.retriever.info.remote]
        probes += [h.ready.remote for h in (self.generator, self.reader, self.vlm) if h is not None]
        results = await asyncio.gather(*(p() for p in probes), return_exceptions=True)
        return not any(isinstance(r, BaseException) or r is False for r in results)

    def check_health(self) -> None:
        """Serve's periodic probe. The pipeline holds no model; its dependencies have their own
        probes, and failing here would only restart this replica for someone else's fault."""
        if self.generator is None and self.reader is None and self.vlm is None:
            raise RuntimeError("no generator, reader or vlm configured")
