"""Text generation over a loaded causal or seq2seq model: batched and streamed, with sampling
parameters, stop sequences and seeds. Used by the Serve generator replicas (no Ray here).

Generation itself is `transformers`' ``generate`` (KV cache, sampling, ``stop_strings``,
``TextIteratorStreamer``); this module only batches prompts, reports finish reasons and token
counts, and trims stop sequences from the returned text the way OpenAI's API does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (hashable: requests with equal params share a batch)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0 means greedy decoding (no sampling)."""
        return self.temperature <= 0.0


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Token ids that end a generation: the model's configured EOS ids, the tokenizer's EOS
    (a chat bundle trained with ``<|im_end|>`` as its end of turn has it as the EOS token) and
    the token that closes an assistant turn in its chat template (Gemma's ``<end_of_turn>``,
    Phi-3's ``<|end|>``), which a model's ``generation_config`` does not always list."""
    from tasks.dialogue import end_of_turn_tokens

    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    turn_end = [tokenizer.convert_tokens_to_ids(t) for t in end_of_turn_tokens(tokenizer)]
    for value in (configured, tokenizer.eos_token_id, turn_end):
        if value is None:
            continue
        for i in value if isinstance(value, list | tuple) else [value]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def trim_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text cut at the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _generate_kwargs(model: Any, tokenizer: Any, params: SamplingParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": stop_token_ids(tokenizer, model) or None,
        "use_cache": True,
    }
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or None,
        )
    if params.stop:
        # generate stops early on these strings; the text is trimmed at them afterwards.
        kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
    return kwargs


def encode_prompts(tokenizer: Any, prompts: Sequence[str], seq2seq: bool) -> dict[str, Any]:
    """Tokenise prompts as training did (no extra special tokens: templates carry their own),
    left-padded for causal models so every row's continuation starts at the same column."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right" if seq2seq else "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _one_prompt_per_call(model: Any) -> bool:
    """Whether the model's generation_config selects assisted decoding (prompt lookup, an
    early-exit assistant), which ``generate`` runs for one prompt at a time only."""
    from transformers.generation.configuration_utils import GenerationMode

    generation = getattr(model, "generation_config", None)
    if generation is None:
        return False
    try:
        return generation.get_generation_mode() == GenerationMode.ASSISTED_GENERATION
    except (ValueError, TypeError):  # generate itself will say what is wrong with it
        return False


def generate_batch(
    model: Any, tokenizer: Any, prompts: Sequence[str], params: SamplingParams, seq2seq: bool
) -> list[Completion]:
    """Generate for several prompts in one ``generate`` call (they share ``params``; one call
    per prompt where the model's decoding strategy takes one prompt at a time)."""
    if len(prompts) > 1 and _one_prompt_per_call(model):
        return [generate_batch(model, tokenizer, [p], params, seq2seq)[0] for p in prompts]
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts, seq2seq).items()}
    if params.seed is not None:
        torch.manual_seed(params.seed)
    with torch.inference_mode():
        out = model.generate(**enc, **_generate_kwargs(model, tokenizer, params))
    new = out if seq2seq else out[:, enc["input_ids"].shape[1] :]
    eos = set(stop_token_ids(tokenizer, model))
    pad = tokenizer.pad_token_id
    results = []
    for i in range(new.shape[0]):
        ids = new[i].tolist()
        if seq2seq and ids and ids[0] == getattr(model.config, "decoder_start_token_id", None):
            ids = ids[1:]
        ended = False
        kept: list[int] = []
        for t in ids:
            if t in eos:
                ended = True
                break
            if t == pad and t not in eos:
                continue
            kept.append(t)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        text, stopped = trim_at_stop(text, params.stop)
        prompt_len = int(enc["attention_mask"][i].sum())
        results.append(
            Completion(
                text=text,
                finish_reason="stop" if ended or stopped else "length",
                prompt_tokens=prompt_len,
                completion_tokens=len(kept) + int(ended),
                token_ids=kept,
            )
        )
    return results


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    params: SamplingParams,
    seq2seq: bool,
    lock: threading.Lock | None = None,
) -> Iterator[str | Completion]:
    """Yield text pieces as they are generated, then one final ``Completion``.

    ``generate`` runs in a thread feeding a ``TextIteratorStreamer``. Text that could be the
    start of a stop sequence is held back until it is known not to be one, so a stop string
    never reaches the client, even split across tokens. A model whose generation_config asks
    for beam search streams its text as one piece when the search ends: no beam is final
    before, and transformers' streamers refuse beams.
    """
    from transformers import TextIteratorStreamer

    if (getattr(getattr(model, "generation_config", None), "num_beams", None) or 1) > 1:
        with lock if lock is not None else contextlib.nullcontext():
            (done,) = generate_batch(model, tokenizer, [prompt], params, seq2seq)
        if done.text:
            yield done.text
        yield done
        return

    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in encode_prompts(tokenizer, [prompt], seq2seq).items()}
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=not seq2seq, skip_special_tokens=True)
    kwargs = {**enc, **_generate_kwargs(model, tokenizer, params), "streamer": streamer}
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            if lock is not None:
                lock.acquire()
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    result["out"] = model.generate(**kwargs)
            finally:
                if lock is not None:
                    lock.release()
        except Exception as err:  # surfaced to the consumer below, not lost in the thread
            result["error"] = err
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    hold = max((len(s) for s in params.stop), default=1) - 1
    text, sent, stopped = "", 0, False
    for piece in streamer:
        text += piece
        trimmed, hit = trim_at_stop(text, params.stop)
        if hit:
            if len(trimmed) > sent:
                yield trimmed[sent:]
            sent, stopped = len(trimmed), True
            break
        safe = len(text) - hold if params.stop else len(text)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    # After a stop sequence generate ends by itself (stop_strings); the streamer's queue is
    # unbounded, so nothing needs draining.
    thread.join()
    if "error" in result:
        raise result["error"]
    if not stopped and len(text) > sent:
        yield text[sent:]
    out = result.get("out")
    prompt_len = int(enc["attention_mask"][0].sum())
    new = out[0] if seq2seq else out[0, enc["input_ids"].shape[1] :]
    if seq2seq:  # without the decoder start token (BART's is its EOS), as generate_batch
        new = new[1:]
    eos = set(stop_token_ids(tokenizer, model))
    ids = [t for t in new.tolist() if t != tokenizer.pad_token_id or t in eos]
    ended = any(t in eos for t in ids)
    yield Completion(
        text=trim_at_stop(text, params.stop)[0],
        finish_reason="stop" if ended or stopped else "length",
        prompt_tokens=prompt_len,
        completion_tokens=len(ids),
    )
