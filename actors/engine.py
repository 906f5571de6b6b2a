"""Continuous (iteration-level) batching for causal LMs and encoder-decoders (T5 and BART
families): one
scheduler per replica owns the model; requests join the running batch between decode steps
and leave as soon as they finish.

Why a scheduler of our own: transformers' continuous batching (``generate_batch`` /
``ContinuousBatchingManager`` over a paged cache) is the library path, but on CPU it measured
~6x slower than one static ``generate`` of the same batch (4-layer h=256 llama, 32 prompts x 64
tokens: 27.8 s against 4.4 s), and vLLM cannot be installed beside this torch. Static
``generate`` cannot take a new request mid-batch. So this module keeps one left-padded
``DynamicCache`` (transformers' own cache class and model forward) and does the scheduling
itself: a new request is prefilled (with other newcomers, left-padded), its cache rows are
padded to the running width and concatenated; a finished or cancelled request's rows are
dropped and leading all-padding columns trimmed. ``position_ids`` are each sequence's own and
rotary/absolute embeddings are applied before caching, so padding never shifts a position; the
2D attention mask hides the padding (under SDPA a decode step is handed the masks transformers
would build from the 2D ones, where a check at start shows the model takes them:
``_decode_masks``). The result is the same computation ``generate`` does for a left-padded
batch.

An encoder-decoder keeps an ``EncoderDecoderCache``: its decoder self-attention rows are joined
and trimmed like a causal LM's, its cross-attention rows, encoder states and encoder mask are
right-padded to the widest prompt (the encoder side is right-padded, as ``generate`` encodes
seq2seq prompts). Decoders take no per-sequence positions. Where positions are relative (T5's
bias over the query-key distance), left-padding shifts both ends of that distance alike, so
rows that started at different steps need nothing more. Absolute-position decoders (BART,
mBART, Marian, Pegasus, M2M100/NLLB, PLBart, MVP, Blenderbot, BlenderbotSmall, LED,
BigBird-Pegasus) number a step's positions from the batch's shared cache
width, which a joined row's would not be: the engine hooks their position module and gives
each row the embedding of its own position (``_RowPositions``). Other families are refused
(``engine_unsupported``) and the server keeps them on static batches.

Prefill (causal LMs): a prompt that starts like a recent one reuses that one's kept K/V
(``actors.prefix_cache``) and runs only the rest of its tokens; newcomers that arrive together
run left-padded to the longest, or packed into one row under a block mask when that costs
fewer FLOPs (``_pack``). Either way each prompt's rows join the running batch left-padded.

Text: a running sequence's text is decoded one new token at a time (tokenizers' streaming
decoder, where the engine's check at start finds it gives what ``decode`` gives), since
decoding every sequence whole at every step costs O(length²) on the engine thread; a finished
request's text is its ids decoded whole, as ``generate``'s caller decodes them.

Beam search (a model whose generation_config sets ``num_beams``, as published summarizers and
translators do): a request holds one row per beam. Its prompt is prefilled once; after each
step ``actors.beam_search`` scores the request's rows with generate's own beam helpers, and
the rows are rebuilt from the rows their beams continue (``_regroup``: the first step turns
the prefilled row into one row per beam). Other requests' rows are untouched, so searches
join and leave the batch like any request; the text goes out in one piece when the search
ends (no beam is final before).

The engine behind the Serve generator is any object with the ``Engine`` interface (submit →
events through a sink, cancel, stats, close): an external engine (vLLM through Ray Serve LLM on
GPU clusters) can stand behind the same deployment. No Ray here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import sys
import threading
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from actors.adapter_rows import BASE, AdapterRows
from actors.beam_search import BeamSearch
from actors.generation import Completion, SamplingParams, stop_token_ids, trim_at_stop
from actors.prefix_cache import KV, PrefixCache

log = logging.getLogger(__name__)

Sink = Callable[[str, Any], None]
"""Receives ``("text", str)`` pieces, then one ``("done", Completion)`` or ``("error", exc)``."""

Dispatcher = Callable[[Callable[[], None]], None]
"""Runs a callback where the sinks live (an event loop's ``call_soon_threadsafe``)."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: retry later (the server answers 503 with Retry-After)."""


class RequestTooLarge(ValueError):
    """A request the scheduler's limits can never hold, even alone (the server answers 413)."""


@dataclass(frozen=True)
class EngineLimits:
    """Bounds on what one replica holds (memory is what the KV cache of these costs)."""

    max_running: int = 32
    """Rows in the running decode batch (a sequence each; a beam search holds one per beam)."""
    max_cached_tokens: int = 32768
    """Prompt + max new tokens reserved by the running rows (the KV cache bound; the
    cache also holds padding up to the widest running row, and an encoder-decoder's
    cross-attention rows are as wide as its widest running prompt)."""
    max_queued: int = 256
    """Requests waiting for a slot; past this, submit raises ``EngineOverloaded``."""
    max_prefill_tokens: int = 4096
    """Prompt tokens prefilled in one step (bounds the pause a join causes running streams)."""
    prefix_cache_tokens: int = 4096
    """Prompt tokens whose K/V are kept for reuse by later prompts that start the same way
    (causal LMs; see ``actors.prefix_cache``); memory beside the running cache. 0 = off."""


class Engine(Protocol):
    """What the generator deployment needs from an engine."""

    def submit(self, prompt: str, params: SamplingParams, adapter: str | None, sink: Sink) -> int:
        """Queue a request; its events go to ``sink``. Raises ``EngineOverloaded``."""
        ...

    def cancel(self, rid: int) -> None:
        """Stop a request (a client went away); its slot is freed at the next step."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for tests and tuning."""
        ...

    def close(self) -> None:
        """Fail what is queued or running and stop."""
        ...


@dataclass(eq=False)
class _Seq:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    sink: Sink
    rng: torch.Generator | None
    ids: list[int] = field(default_factory=list)  # generated, without a final EOS
    generated: int = 0  # tokens generated (an ending EOS included)
    position: int = 0  # position id of ``last`` (the token fed at the next step)
    last: int = 0  # the token fed at the next step
    sent: int = 0  # characters of text already handed to the sink
    # The text of ``ids`` decoded one token at a time (``_text``), the decoder's state, how
    # many ids it has taken, and whether it holds back the newest (a character not complete)
    text: str = ""
    stream: Any = None
    fed: int = 0
    held: bool = False
    whole: bool = False  # decoded whole at every step: its streaming decoder failed on it
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    # generate's logits processors for this request (built at its first token) and, where
    # there are any, the tokens they read: generate's input_ids for this sequence alone
    processors: Any = None
    seen: torch.Tensor | None = None
    seen_len: int = 0
    # A beam search's request runs ``width`` rows (one per beam, each a ``_Seq`` sharing the
    # search); its first row is the request's own, whose sink gets the events.
    width: int = 1
    beams: BeamSearch | None = None
    rows: list[_Seq] | None = None  # the first row's: every row of its search, beam order

    @property
    def budget(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def head(self) -> bool:
        """Whether this row is its request's own (not a further beam's)."""
        return self.rows is None or self.rows[0] is self

    @property
    def over(self) -> bool:
        """Whether this row's request is finished or cancelled (a cancel marks the rows it
        finds, and a beam's row made since is over with its request's own)."""
        own = self if self.rows is None else self.rows[0]
        return self.cancelled or self.done or own.cancelled or own.done


def _cjk(ch: str) -> bool:
    """CJK ideographs carry no spaces: like ``TextStreamer``, flush after each one."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _plain(text: str) -> bool:
    """Only letters, marks, digits and whitespace: ``TextStreamer`` prints such text at once."""
    return all(ch.isspace() or unicodedata.category(ch)[0] in "LMN" for ch in text)


def _pad(t: torch.Tensor, n: int, dim: int, left: bool = True) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    pad = t.new_zeros(shape)
    return torch.cat([pad, t] if left else [t, pad], dim=dim)


# Encoder-decoder families whose decoder attends with a bias over the query-key distance
# (``compute_bias`` over cache columns) and takes no absolute positions: left-padding a joined
# row's decoder cache leaves every distance, hence every output, unchanged (tested per family).
RELATIVE_DECODERS = frozenset({"t5", "mt5", "umt5", "longt5"})

# Encoder-decoder families whose decoder adds ``embed_positions(..., cache_length, ...)`` — a
# function of the step's position alone — to its token embeddings: the engine recomputes that
# output per row (``_RowPositions``), so rows that joined at different steps each get their own
# position (tested per family).
ABSOLUTE_DECODERS = frozenset({
    "bart", "mbart", "marian", "pegasus", "m2m_100", "plbart", "mvp", "blenderbot",
    "blenderbot-small", "led", "bigbird_pegasus",
})  # fmt: skip

# How ``generate`` shapes each step's scores from the model's generation_config (repetition
# penalties, n-gram bans, minimum lengths, banned and suppressed tokens, sequence biases, forced
# first and last tokens, min-p / typical / epsilon / eta sampling, watermarks) comes from its
# own builder, ``_get_logits_processor``, per request (``_request_processors``). Beam search
# (and beam sampling) runs as generate runs it, each request's beams as rows of the batch
# (``actors.beam_search``). What the engine cannot run is another decoding strategy:
# contrastive search, DoLa, group or constrained beam search, assisted decoding (as
# transformers' ``get_generation_mode`` reads the config), and classifier-free guidance (a
# second, unconditional forward per step). A model whose config selects one is served by
# static ``generate``, so that its output is the output its authors configured.


def _strategy_unsupported(generation: Any) -> str | None:
    """Why the engine cannot decode as ``generation`` asks, or None."""
    if generation is None:
        return None
    from transformers.generation.configuration_utils import GenerationMode

    probe = copy.deepcopy(generation)
    probe.do_sample = False  # each request says whether it samples
    try:
        mode = probe.get_generation_mode()
    except (ValueError, TypeError) as err:
        return f"its generation_config cannot be read here ({err})"
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.BEAM_SEARCH):
        named = {
            key: getattr(generation, key, None)
            for key in ("num_beams", "num_beam_groups", "penalty_alpha", "dola_layers",
                        "prompt_lookup_num_tokens", "constraints", "force_words_ids")
        }  # fmt: skip
        given = [f"{k}={v!r}" for k, v in named.items() if v not in (None, 1, [], 0)]
        return (
            f"its generation_config selects {str(mode.value).replace('_', ' ')} "
            f"({', '.join(given) or 'see its generation_config'}), which the continuous-batching "
            "engine does not run (it runs greedy decoding, sampling and beam search)"
        )
    if getattr(generation, "guidance_scale", None) not in (None, 1, 1.0):
        return (
            f"its generation_config sets guidance_scale={generation.guidance_scale!r}, which "
            "runs a second, unconditional forward per step; the continuous-batching engine "
            "does not"
        )
    return None


def engine_unsupported(model: Any) -> str | None:
    """Why ``ContinuousBatchingEngine`` cannot run ``model`` as ``generate`` would, or None
    when it can."""
    reason = _strategy_unsupported(getattr(model, "generation_config", None))
    if reason is not None:
        return reason
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    kind = getattr(config, "model_type", "?")
    if kind in RELATIVE_DECODERS:
        return None
    if kind in ABSOLUTE_DECODERS:
        if _position_module(model) is not None:
            return None
        return (
            f"the '{kind}' decoder's position module takes no cache length here (another "
            f"transformers version?), which the engine needs to give each row of a joined "
            f"batch its own position"
        )
    covered = ", ".join(sorted(RELATIVE_DECODERS | ABSOLUTE_DECODERS))
    return (
        f"the '{kind}' decoder numbers positions from the batch's shared cache length and the "
        f"engine does not know how to give its rows their own, so a sequence joining "
        f"mid-batch would get shifted positions (continuous batching covers the "
        f"encoder-decoders {covered})"
    )


# What the decoders pass their position module as the step's cache length (transformers 5.25
# renamed ``past_key_values_length``).
_LENGTH_ARGS = ("cache_length", "past_key_values_length")


def _position_module(model: Any) -> torch.nn.Module | None:
    """The decoder's ``embed_positions`` module of an absolute-position encoder-decoder, if it
    takes the step's cache length (what ``_RowPositions`` replaces per row)."""
    get_base = getattr(model, "get_base_model", None)  # under PEFT, the wrapped model
    base = get_base() if get_base is not None else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    module = getattr(decoder, "embed_positions", None)
    if not isinstance(module, torch.nn.Module):
        return None
    if not set(_LENGTH_ARGS) & set(inspect.signature(module.forward).parameters):
        return None
    return module


class _RowPositions:
    """Each decoder row's own position embedding in a joined batch, for absolute-position
    encoder-decoders.

    Why by hand: these decoders compute one position for a step from the batch's shared
    cache width (``cache_length``) and take no per-row positions, and transformers has no
    switch for it. A row that joined the batch later has fewer decoder tokens than that width,
    so this forward hook on the decoder's position module replaces its output during decode
    steps: for each distinct row position it calls the module's own ``forward`` with that
    ``cache_length`` (and ``position_ids`` moved by as much, where the decoder passes them),
    which is what ``generate`` computes for that sequence alone, and gives each row its
    position's embedding. Prefill needs nothing: every newcomer's decoder starts at 0. The
    rows are the engine thread's own, so a ``generate`` on the same model in another thread
    runs unchanged.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.signature = inspect.signature(module.forward)
        self.length_arg = next(a for a in _LENGTH_ARGS if a in self.signature.parameters)
        self._rows: tuple[int, list[int]] | None = None  # (engine thread id, row positions)
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    @property
    def rows(self) -> list[int] | None:
        """The row positions of the decode step this thread runs, or None."""
        owner = self._rows
        return owner[1] if owner is not None and owner[0] == threading.get_ident() else None

    @rows.setter
    def rows(self, rows: list[int] | None) -> None:
        self._rows = None if rows is None else (threading.get_ident(), rows)

    def _hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> torch.Tensor | None:
        rows = self.rows
        if rows is None:
            return None
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        shared = int(call[self.length_arg])
        given = call.get("position_ids")
        by_position: dict[int, torch.Tensor] = {}
        for position in sorted(set(rows)):
            call[self.length_arg] = position
            if given is not None:
                call["position_ids"] = given - shared + position
            own = module.forward(**call)
            # (steps, d), (1, steps, d) or (rows, steps, d), as each family returns it
            by_position[position] = own if own.dim() == 3 else own.unsqueeze(0)
        return torch.stack(
            [by_position[p][i if by_position[p].shape[0] > 1 else 0] for i, p in enumerate(rows)]
        )


class ContinuousBatchingEngine:
    """Iteration-level scheduler over a causal LM or a T5- or BART-family encoder-decoder (see the
    module docstring; ``engine_unsupported`` names the models it refuses).

    One thread runs steps: admit waiting requests that fit the limits (FIFO) and prefill them,
    drop finished and cancelled rows, then one batched decode step for every running sequence.
    Each sequence keeps its own sampling settings, seed (its own ``torch.Generator``: a seeded
    request samples the same tokens whatever else is in the batch), stop sequences and token
    budget. ``lock`` is held during each step: code that swaps adapters on ``model`` takes it.
    Adapters of one PEFT base share a batch, each row (and, in a packed prefill, each token)
    through its own adapter (``actors.adapter_rows``; ``"__base__"`` for the plain model).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        limits: EngineLimits | None = None,
        prepare: Callable[[set[str]], None] | None = None,
    ) -> None:
        reason = engine_unsupported(model)
        if reason is not None:
            raise ValueError(f"continuous batching: {reason}")
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or EngineLimits()
        self.prepare = prepare  # called under ``lock`` with the adapters the next step uses
        self.dispatcher: Dispatcher | None = None
        self.lock = threading.RLock()
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # decoder (self-attention) mask, left-padded
        # Encoder-decoders only: the running rows' encoder states and mask, right-padded.
        self._enc_out: torch.Tensor | None = None
        self._enc_mask: torch.Tensor | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: threading.Thread | None = None
        # the engine thread's CPU clock while it runs, and its CPU seconds once it has ended
        self._cpu_clock: int | None = None
        self._cpu_final: float | None = None
        self._cpu_clockless = False
        config = getattr(model, "config", None)
        self._seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        self._start = _decoder_start(model) if self._seq2seq else None
        # Each request's scores go through generate's own processors for it (the config's
        # penalties, bans, minimum lengths, forced tokens, ...: ``_request_processors``). A
        # sampled row takes the engine's grouped temperature / top-k / top-p warpers, unless the
        # config's sampling goes beyond them (min-p, typical, ...): then generate's, per row.
        self._stop_ids = stop_token_ids(tokenizer, model)
        self._eos = set(self._stop_ids)
        # A beam search's stop-string criterion, per set of stop strings. Building one walks
        # the whole vocabulary (~30 ms for 30k tokens even on transformers' own cache hit, and
        # ~200 ms on a miss) on the engine thread, where it stalls every running stream; the
        # criterion keeps no state between calls, so searches with the same stops share one
        # (the most recently used 32 sets).
        self._stop_criterion = functools.lru_cache(maxsize=32)(self._new_stop_criterion)
        # The running text of each sequence, decoded one token at a time where the tokenizer's
        # own streaming decoder matches its ``decode`` (``_stream_decoder``): decoding every
        # sequence's whole text at every step costs O(length²) (at 2k tokens and 64 streams,
        # ~30 ms a step on the engine thread, as long as a GPU's decode step).
        # With byte fallback (SentencePiece's layout: Llama 2, Mistral, Gemma) a run of byte
        # tokens decodes as one, so a later byte can turn characters already decoded into
        # U+FFFD; such runs are decoded (and streamed) only once a token closes them.
        self._byte_runs = byte_runs(tokenizer)
        self._streaming = _stream_decoder(tokenizer, self._byte_runs)
        # A config that selects beam search gives every request that many rows (generate's
        # num_beams); 1 is greedy decoding or sampling.
        self._width = int(
            getattr(getattr(model, "generation_config", None), "num_beams", None) or 1
        )
        if self._width > self.limits.max_running:
            raise ValueError(
                f"continuous batching: the model searches {self._width} beams (its "
                f"generation_config's num_beams), more rows than scheduler.max_running="
                f"{self.limits.max_running}"
            )
        try:
            self._any_processors, self._own_warpers = self._probe_processors()
        except Exception as err:  # a transformers whose private builder changed shape
            raise ValueError(
                f"continuous batching: generate's logits processors could not be built for "
                f"this model ({type(err).__name__}: {err})"
            ) from err
        kind = getattr(config, "model_type", None)
        module = _position_module(model) if self._seq2seq and kind in ABSOLUTE_DECODERS else None
        self._row_positions = _RowPositions(module) if module is not None else None
        self._adapter_rows: AdapterRows | None = None  # made at the first PEFT forward
        # Reuse and packing change where a prompt's tokens sit in the cache (a hole after a
        # reused prefix, prompts side by side in one row): right for full causal attention
        # over position_ids, wrong where masks count columns — sliding windows and chunked
        # attention — or positions come from the mask (ALiBi). Those models, and encoders
        # (they attend both ways, so a shared start does not fix their states), get neither.
        plain = not self._seq2seq and _plain_attention(config)
        self.prefix = PrefixCache() if plain else None
        # Newcomers may run packed (no padding computed) under SDPA, whose kernels take the
        # block mask that needs; flash attention and eager models take left-padded rows.
        # None: packed where ``_pack`` estimates it cheaper; True / False: wherever possible /
        # never (tests and benchmarks compare the two).
        impl = getattr(getattr(self._base(), "config", None), "_attn_implementation", None)
        self._packable = plain and impl == "sdpa"
        self.packing: bool | None = None if self._packable else False
        self._hidden = int(getattr(config, "hidden_size", 0) or 1024)
        # A relative-position decoder has no position table to run past, nor has a sinusoidal
        # one that grows on demand (M2M100's ``make_weights``); an absolute encoder's table
        # bounds the prompt (past it the encoder's lookup fails, on CUDA for the whole batch).
        # (LED names its encoder's and decoder's tables apart)
        table = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        encoder_table = getattr(config, "max_encoder_position_embeddings", None) or table
        decoder_table = getattr(config, "max_decoder_position_embeddings", None) or table
        grows = module is not None and hasattr(module, "make_weights")
        self._max_positions = None if self._seq2seq and (module is None or grows) else decoder_table
        self._max_prompt = encoder_table if module is not None and not grows else None
        accepted = inspect.signature(self._base().forward).parameters
        self._keep_logits = "logits_to_keep" in accepted
        # transformers 5.25 renamed the forward's cache argument; earlier 5.x take the old name.
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        # A decode step's masks, handed over as transformers would build them
        # (``_decode_masks``)
        # where a check shows the model takes them so.
        refusal = (
            _ready_mask_refusal(self._base(), self._cache_arg, self._device(), self._start)
            if impl == "sdpa" and _plain_attention(config)
            else "not plain attention under SDPA"
        )
        self._ready_masks = refusal is None
        log.info("engine: decode masks %s", "ready-made" if refusal is None else f"2D ({refusal})")
        # (a decoder row has padding, the encoder mask ready-made); None after a join or drop
        self._ready_state: tuple[bool, torch.Tensor | None] | None = None
        self.counters: Counter[str] = Counter()
        self.prefill_sizes: Counter[int] = Counter()
        self.decode_sizes: Counter[int] = Counter()
        # Wall seconds the engine thread spent prefilling, decoding and waiting for work: how
        # busy the replica's model is, and what share of it joins cost.
        self.seconds: Counter[str] = Counter(prefill=0.0, decode=0.0, idle=0.0)
        # Per request, summed (so that two snapshots give the mean over any window): seconds
        # from submit to the start of its prefill (waiting) and to its first token.
        self.latency: Counter[str] = Counter(waiting=0.0, first_token=0.0, requests=0)

    # ----- public interface -------------------------------------------------------------------
    def submit(self, prompt: str, params: SamplingParams, adapter: str | None, sink: Sink) -> int:
        """Tokenise and queue one request (see ``Engine.submit``); ``RequestTooLarge`` when
        the limits can never hold it."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("prompt: empty after tokenisation")
        if self._max_prompt is not None and len(ids) > self._max_prompt:
            raise ValueError(
                f"prompt: {len(ids)} tokens, more than the model's {self._max_prompt} positions; "
                "shorten it"
            )
        reason = self._refusal(len(ids), params, self.limits)
        if reason is not None:
            raise RequestTooLarge(reason)
        rng = None
        if not params.greedy:
            rng = torch.Generator(device=self._device())
            seed = params.seed
            if seed is None:
                seed = int.from_bytes(os.urandom(8), "little")
            rng.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        with self._cond:
            if self._closed:
                raise RuntimeError("the generation engine is shut down")
            if len(self._waiting) >= self.limits.max_queued:
                self.counters["refused"] += 1
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests are already waiting "
                    f"(scheduler.max_queued={self.limits.max_queued}); retry later"
                )
            seq = _Seq(next(self._ids), list(ids), params, adapter, sink, rng, width=self._width)
            self._waiting.append(seq)
            self.counters["submitted"] += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="taskray-engine", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return seq.rid

    def _refusal(self, prompt_len: int, params: SamplingParams, limits: EngineLimits) -> str | None:
        """Why a request of this size can never run under ``limits``, even alone, or None."""
        width = self._width
        if (prompt_len + params.max_new_tokens) * width > limits.max_cached_tokens:
            beams = f" for each of the model's {width} beams" if width > 1 else ""
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_new_tokens}){beams} "
                f"exceed the scheduler's max_cached_tokens={limits.max_cached_tokens}"
            )
        if width > limits.max_running:
            return (
                f"the model searches {width} beams (its generation_config's num_beams), more "
                f"rows than the scheduler's max_running={limits.max_running}; raise it"
            )
        return None

    def cancel(self, rid: int) -> None:
        """Mark a request cancelled; the engine thread drops it before its next step."""
        with self._cond:
            for seq in itertools.chain(self._waiting, self._running):
                if seq.rid == rid:
                    seq.cancelled = True
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        """Queue and batch figures (``running`` (rows: a beam search runs one per beam),
        ``running_requests`` and ``waiting`` are live counts;
        ``cache_width`` and ``encoder_width``: the running batch's decoder and encoder cache
        columns; ``ready_masks``: whether decode steps hand the model its masks ready-made
        (``_decode_masks``); ``seconds``: the engine thread's time prefilling, decoding and idle
        so far;
        ``latency_s``: over ``requests`` prefilled, the summed seconds each waited from submit
        to its prefill and to its first token (a beam search's first step; its text goes out
        when the search ends); ``thread_cpu_s``: the CPU seconds the engine thread has used,
        which against its busy seconds shows how long it waited for a core or the GIL)."""
        with self._cond:
            running, waiting = len(self._running), len(self._waiting)
            reserved = sum(s.budget for s in self._running)
            requests = sum(s.head for s in self._running)
        # read once: the engine thread may reset them between two reads
        mask, enc_mask = self._mask, self._enc_mask
        return {
            "running": running,
            "running_requests": requests,
            "waiting": waiting,
            "reserved_tokens": reserved,
            "cache_width": 0 if mask is None else int(mask.shape[1]),
            "encoder_width": 0 if enc_mask is None else int(enc_mask.shape[1]),
            "ready_masks": self._ready_masks,
            "prefill_batch_sizes": dict(self.prefill_sizes),
            "decode_batch_sizes": dict(self.decode_sizes),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "latency_s": dict(self.latency),
            "thread_cpu_s": self._thread_cpu_s(),
            "prefix_cache": {"entries": len(self.prefix), "tokens": self.prefix.tokens}
            if self.prefix is not None else None,
            **dict(self.counters),
        }  # fmt: skip

    def _thread_cpu_s(self) -> float | None:
        """CPU seconds of the engine thread so far: 0.0 before it starts, its total once it
        has ended, None where the platform has no per-thread CPU clock for another thread
        (``time.pthread_getcpuclockid``: Linux and the BSDs, not macOS or Windows). Read
        from the caller's thread through the clock the engine thread took when it started,
        so the loop pays nothing for it."""
        if self._cpu_final is not None:
            return self._cpu_final
        if self._thread is None:
            return 0.0
        clock = self._cpu_clock
        if clock is None:  # the thread is starting, or has no clock to read (then None)
            return None if self._cpu_clockless else 0.0
        try:
            return time.clock_gettime(clock)
        except OSError:  # the thread ended between the two reads: its total is set by now
            return self._cpu_final

    @property
    def rows_per_request(self) -> int:
        """Rows one request holds in the running batch: the model's beams (1 without beam
        search); ``limits.max_running`` must allow at least this many."""
        return self._width

    def forget_adapter(self, adapter: str) -> None:
        """Drop the kept prompt K/V computed through an adapter (it is being unloaded: a new
        adapter under the same name must not meet them). Takes ``lock``."""
        with self.lock:
            if self.prefix is not None:
                self.prefix.forget(adapter)

    def close(self) -> None:
        """Fail every queued and running request and end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._row_positions is not None:  # the model may outlive its engine
            self._row_positions.handle.remove()
        if self._adapter_rows is not None:
            self._adapter_rows.remove()

    # ----- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        except (AttributeError, OSError):  # no per-thread CPU clocks on this platform
            self._cpu_clockless = True
        try:
            self._steps()
        finally:
            self._cpu_final = time.thread_time()

    def _steps(self) -> None:
        """Admit, prefill, decode and deliver until closed (the engine thread's body)."""
        torch.set_grad_enabled(False)
        while True:
            events: list[tuple[Sink, str, Any]] = []
            with self._cond:
                if not self._waiting and not self._running and not self._closed:
                    idle_since = time.perf_counter()
                    while not self._waiting and not self._running and not self._closed:
                        self._cond.wait()
                    self.seconds["idle"] += time.perf_counter() - idle_since
                if self._closed:
                    gone = [*self._waiting, *(s for s in self._running if s.head)]
                    self._waiting.clear()
                    self._running.clear()
                    err = RuntimeError("the generation engine is shut down")
                    self._deliver([(s.sink, "error", err) for s in gone])
                    return
                admit = self._admit(events)
            try:
                with self.lock, torch.inference_mode():
                    self._drop(events)
                    if self.prepare is not None:
                        names = {s.adapter for s in [*self._running, *admit] if s.adapter}
                        self.prepare(names)
                    t0 = time.perf_counter()
                    if admit:
                        self._prefill(admit, events)
                        # Newcomers' first tokens go out now, not after the decode step.
                        self._deliver(events)
                        events = []
                        self._drop(events)  # those that ended at their first token
                    t1 = time.perf_counter()
                    if self._running:
                        self._decode(events)
                    self.seconds["prefill"] += t1 - t0
                    self.seconds["decode"] += time.perf_counter() - t1
                    self._drop(events)
            except Exception as err:  # a failed decode step fails the batch it ran
                log.exception("decode step failed")
                with self._cond:
                    gone, self._running = self._running, []
                self._reset_cache()
                events += [(s.sink, "error", err) for s in gone if s.head and not s.done]
            self._deliver(events)

    def _admit(self, events: list[tuple[Sink, str, Any]]) -> list[_Seq]:
        """FIFO: waiting requests while slots, cached tokens and the prefill budget allow
        (caller holds ``_cond``). Budgets are reserved whole, so nothing is ever preempted. A
        request that no longer fits the limits even alone (they were lowered while it waited)
        fails rather than waiting for ever."""
        admit: list[_Seq] = []
        reserved = sum(s.budget for s in self._running)
        rows, prefill = len(self._running), 0
        limits = self.limits
        while self._waiting:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                self.counters["cancelled"] += 1
                continue
            reason = self._refusal(len(seq.prompt_ids), seq.params, limits)
            if reason is not None:  # the limits were lowered while it waited
                self._waiting.popleft()
                self.counters["failed"] += 1
                events.append((seq.sink, "error", RequestTooLarge(reason)))
                continue
            if rows + seq.width > limits.max_running:
                break
            if reserved + seq.budget * seq.width > limits.max_cached_tokens:
                break
            if admit and prefill + len(seq.prompt_ids) > limits.max_prefill_tokens:
                break
            self._waiting.popleft()
            admit.append(seq)
            rows += seq.width
            reserved += seq.budget * seq.width
            prefill += len(seq.prompt_ids)
        return admit

    def _deliver(self, events: list[tuple[Sink, str, Any]]) -> None:
        if not events:
            return

        def run() -> None:
            for sink, kind, payload in events:
                try:
                    sink(kind, payload)
                except Exception:  # one consumer's bug must not stop the others
                    log.exception("event sink failed")

        if self.dispatcher is None:
            run()
        else:
            self.dispatcher(run)

    # ----- model steps --------------------------------------------------------------------------
    def _base(self) -> Any:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(
        self,
        seqs: Sequence[_Seq],
        keep: torch.Tensor | None = None,
        tokens: list[str] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """The model's forward for these rows (one adapter per row) → (logits of each row's
        last position, output); with ``keep`` (a single row's column indices), the logits at
        those columns; with ``tokens``, one packed row whose tokens each have an adapter."""
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1 if keep is None else keep
        rows = self._adapter_rows_now()
        if rows is None:
            out = self.model(use_cache=True, return_dict=True, **kwargs)
        else:
            names = [s.adapter or BASE for s in seqs]
            with rows.packed(tokens) if tokens is not None else rows.rows(names):
                out = self.model(use_cache=True, return_dict=True, **kwargs)
        if keep is None:
            return out.logits[:, -1, :].float(), out
        logits = out.logits[0] if self._keep_logits else out.logits[0, keep]
        return logits.float(), out

    def _adapter_rows_now(self) -> AdapterRows | None:
        """The rows' adapters' runner for the model as it is now (``actors.adapter_rows``);
        a new model object (adapters added to a plain base, or the last one unloaded) gets its
        own; ``None`` for a model without adapters."""
        if self._adapter_rows is not None and self._adapter_rows.model is not self.model:
            self._adapter_rows.remove()  # and let the old model and its stacked weights go
            self._adapter_rows = None
        # Not imported here: importing peft took 0.13 s here with its files cached and 2.2 s
        # cold, which the first step of a replica without adapters would spend on the engine
        # thread (its first requests waiting); a PeftModel exists only once peft is imported.
        peft = sys.modules.get("peft")
        if peft is None or not isinstance(self.model, peft.PeftModel):
            return None
        if self._adapter_rows is None:
            self._adapter_rows = AdapterRows(self.model)
        return self._adapter_rows

    def _prefill(self, seqs: list[_Seq], events: list[tuple[Sink, str, Any]]) -> None:
        """Prefill newcomers together; if that fails, one at a time, so a prompt that makes the
        model raise fails alone."""
        try:
            self._prefill_rows(seqs, events)
        except Exception as err:
            if len(seqs) == 1:
                self._fail(seqs, err, events)
                return
            for seq in seqs:
                try:
                    self._prefill_rows([seq], events)
                except Exception as one:
                    self._fail([seq], one, events)

    def _fail(self, seqs: list[_Seq], err: Exception, events: list[tuple[Sink, str, Any]]) -> None:
        log.warning("prefill failed for %d request(s): %s", len(seqs), err)
        self.counters["failed"] += len(seqs)
        events += [(s.sink, "error", err) for s in seqs]

    def _end(self, seqs: list[_Seq], err: Exception, events: list[tuple[Sink, str, Any]]) -> None:
        """Fail requests whose rows are in the running batch: each gets ``err``; their rows
        (every beam's) leave at the next ``_drop``."""
        self._fail(seqs, err, events)
        for seq in seqs:
            seq.done = True

    def _prefill_rows(self, seqs: list[_Seq], events: list[tuple[Sink, str, Any]]) -> None:
        """Prefill newcomers and take their first tokens. What raises before their rows join
        the batch propagates (``_prefill`` retries them one at a time); after, they fail
        here, together, and leave at the next ``_drop``."""
        self.prefill_sizes[len(seqs)] += 1  # attempts: a failed prefill counts too
        started = time.perf_counter()
        for seq in seqs:
            if seq.width > 1 and seq.beams is None:
                self._start_search(seq)
        logits = self._prefill_seq2seq(seqs) if self._seq2seq else self._prefill_causal(seqs)
        for seq in seqs:
            # the position of the token just fed (_advance moves on): the last prompt
            # token's, or the decoder start's
            seq.position = 0 if self._seq2seq else len(seq.prompt_ids) - 1
        with self._cond:
            self._running.extend(seqs)
        try:
            self._advance(seqs, logits, events)
        except Exception as err:  # joined already: a retry would join them twice
            log.exception("first tokens failed")
            self._end([s for s in seqs if not s.over], err, events)
        now = time.perf_counter()
        self.latency.update(
            requests=len(seqs),
            waiting=sum(started - s.submitted for s in seqs),
            first_token=sum(now - s.submitted for s in seqs),
        )

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def _prefill_seq2seq(self, seqs: list[_Seq]) -> torch.Tensor:
        """Encode the prompts (right-padded, as ``generate`` does) and take each decoder's
        first step in the same forward; join the rows; the first step's logits."""
        from transformers import DynamicCache, EncoderDecoderCache

        device = self._device()
        n, width = len(seqs), max(len(s.prompt_ids) for s in seqs)
        input_ids = torch.full((n, width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
            mask[row, : len(seq.prompt_ids)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        first = torch.full((n, 1), self._start, dtype=torch.long, device=device)
        dec_mask = torch.ones((n, 1), dtype=torch.long, device=device)
        logits, out = self._forward(
            seqs, input_ids=input_ids, attention_mask=mask, decoder_input_ids=first,
            decoder_attention_mask=dec_mask, **{self._cache_arg: cache},
        )  # fmt: skip
        self._join(cache, dec_mask, (out.encoder_last_hidden_state, mask))
        self.counters["prefill_tokens"] += int(mask.sum())
        return logits

    def _prefill_causal(self, seqs: list[_Seq]) -> torch.Tensor:
        """Prefill causal prompts, join their rows (left-padded to end at one column) and
        return the last prompt tokens' logits.

        A prompt that starts like a kept one (``prefix``) runs only the rest of its tokens,
        after the kept K/V. Newcomers run packed into one row (``_run_packed``) or left-padded
        (``_run_padded``), as ``_pack`` decides. Each prompt's own K/V is kept for later
        prompts afterwards."""
        from transformers import DynamicCache

        limit = self.limits.prefix_cache_tokens if self.prefix is not None else 0
        if self.prefix is not None and self.prefix.tokens > limit:  # lowered (hot config)
            self.prefix.shrink(limit)
        reuse = self.prefix is not None and limit > 0
        hits = [
            self.prefix.lookup(s.adapter, s.prompt_ids) if reuse and self.prefix else (0, None)
            for s in seqs
        ]
        # the newcomers' rows as they join the running batch: left-padded to the longest
        width = max(len(s.prompt_ids) for s in seqs)
        joined = torch.zeros((len(seqs), width), dtype=torch.long, device=self._device())
        for row, seq in enumerate(seqs):
            joined[row, width - len(seq.prompt_ids) :] = 1
        if self._pack(seqs, hits):
            try:
                logits, layers = self._run_packed(seqs, hits, joined)
            except Exception as err:
                logits, layers = self._run_padded(seqs, hits, joined)  # raises if the rows do
                adapters = sorted({s.adapter or BASE for s in seqs})
                if len(adapters) > 1 and self._adapter_rows is not None:
                    # a layer that cannot take these adapters per token: only they stop packing
                    self._adapter_rows.no_packing(adapters)
                    log.warning("packed prefill across adapters %s failed, they run left-padded "
                                "together from now on: %s", adapters, err)  # fmt: skip
                else:  # a forward that cannot take the block mask
                    log.warning("packed prefill failed, newcomers run left-padded from now on: "
                                "%s", err)  # fmt: skip
                    self._packable = False
        else:
            logits, layers = self._run_padded(seqs, hits, joined)
        if reuse and self.prefix is not None:
            for row, seq in enumerate(seqs):
                cols = slice(width - len(seq.prompt_ids), width)
                own = [(k[row : row + 1, :, cols], v[row : row + 1, :, cols]) for k, v in layers]
                self.prefix.store(seq.adapter, seq.prompt_ids, own, limit)
        self._join(DynamicCache(ddp_cache_data=layers), joined)
        reused = sum(p for p, _ in hits)
        self.counters["prefix_hits"] += sum(p > 0 for p, _ in hits)
        self.counters["prefix_tokens"] += reused
        self.counters["prefill_tokens"] += sum(len(s.prompt_ids) for s in seqs) - reused
        return logits

    # A packed prefill's boolean mask holds (prompt tokens run) x (tokens attended) entries:
    # past this many, newcomers are left-padded instead.
    PACKED_MASK_ELEMENTS = 1 << 26

    def _pack(self, seqs: list[_Seq], hits: list[tuple[int, KV | None]]) -> bool:
        """Whether newcomers run packed: under SDPA, through one adapter or through adapters
        that ``AdapterRows`` can apply per token, and (``packing`` None) when that costs fewer
        FLOPs than left-padded rows. Packing runs no padding but attends densely across the
        whole row (the mask hides what is not a prompt's own): per layer a token's projections
        and MLP cost ~24h² FLOPs (a llama-shaped block of width h), one query-key pair ~4h."""
        if not self._packable or self.packing is False:
            return False
        if len(seqs) < 2:
            return False
        adapters = {s.adapter or BASE for s in seqs}
        if len(adapters) > 1:
            rows = self._adapter_rows_now()
            if rows is None or not rows.packs(adapters):
                return False
        rests = [len(s.prompt_ids) - p for s, (p, _) in zip(seqs, hits, strict=True)]
        kept = [p for p, _ in hits]
        run, width = sum(rests), max(rests)
        if run * (sum(kept) + run) > self.PACKED_MASK_ELEMENTS:
            return False
        if self.packing:
            return True
        pair = 1 / (6 * self._hidden)  # a pair's FLOPs in tokens' FLOPs

        def cost(tokens: int, pairs: int) -> float:
            return tokens + pairs * pair

        packed = cost(run, run * (sum(kept) + run))
        padded = cost(len(seqs) * width, len(seqs) * width * (max(kept) + width))
        return packed < padded

    @staticmethod
    def _rows(
        cache: Any, source: torch.Tensor, columns: list[torch.Tensor], joined: torch.Tensor
    ) -> KV:
        """Each prompt's K/V out of a prefill's cache as the rows ``joined`` lays out (left-
        padded, ``[n, heads, width, head_dim]``): prompt ``i`` reads batch row ``source[i]``
        at ``columns[i]``, in order. One gather per tensor, its padding zeroed."""
        device, width = source.device, joined.shape[1]
        index = torch.zeros((len(columns), width), dtype=torch.long)
        for row, cols in enumerate(columns):
            index[row, width - len(cols) :] = cols
        index, padding = index.to(device), (joined == 0)[:, :, None, None]
        rows = source[:, None].expand_as(index)

        def gather(t: torch.Tensor) -> torch.Tensor:
            picked = t[rows, :, index].masked_fill_(padding, 0)  # [n, width, H, D]
            return picked.permute(0, 2, 1, 3)

        return [(gather(layer.keys), gather(layer.values)) for layer in cache.layers]

    def _run_padded(
        self, seqs: list[_Seq], hits: list[tuple[int, KV | None]], joined: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        """One forward over left-padded rows, reused K/V left-padded to the longest reused
        prefix before them (a row's mask has a hole between its prefix and the rest) → each
        row's last logits and its K/V as rows laid out as ``joined``. Every row gets those prefix
        columns for this forward, reused or not: one long reuse among many fresh prompts
        costs memory and attention in all of them, until the rows are joined."""
        from transformers import DynamicCache

        device, n = self._device(), len(seqs)
        kept = max(p for p, _ in hits)
        run = max(len(s.prompt_ids) - p for s, (p, _) in zip(seqs, hits, strict=True))
        input_ids = torch.full((n, run), self._pad_id(), dtype=torch.long)
        positions = torch.zeros((n, run), dtype=torch.long)
        mask = torch.zeros((n, kept + run), dtype=torch.long)
        for row, (seq, (p, _)) in enumerate(zip(seqs, hits, strict=True)):
            rest = len(seq.prompt_ids) - p
            input_ids[row, run - rest :] = torch.tensor(seq.prompt_ids[p:])
            positions[row, run - rest :] = torch.arange(p, len(seq.prompt_ids))
            mask[row, kept - p : kept] = 1
            mask[row, kept + run - rest :] = 1
        past = None
        if kept:
            sample = next(kv for _, kv in hits if kv is not None)

            def prefix(p: int, kv: KV | None, layer: int, part: int) -> torch.Tensor:
                if kv is not None:
                    return _pad(kv[layer][part], kept - p, 2)
                like = sample[layer][part]
                return like.new_zeros((1, like.shape[1], kept, like.shape[3]))

            past = [tuple(torch.cat([prefix(p, kv, layer, part) for p, kv in hits])
                          for part in (0, 1)) for layer in range(len(sample))]  # fmt: skip
        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        logits, _ = self._forward(
            seqs, input_ids=input_ids.to(device), attention_mask=mask.to(device),
            position_ids=positions.to(device), **{self._cache_arg: cache},
        )  # fmt: skip
        columns = [row.nonzero().squeeze(1) for row in mask]
        source = torch.arange(n, device=device)
        return logits, self._rows(cache, source, columns, joined)

    def _run_packed(
        self, seqs: list[_Seq], hits: list[tuple[int, KV | None]], joined: torch.Tensor
    ) -> tuple[torch.Tensor, KV]:
        """One forward over one row: the prompts' remaining tokens back to back, after their
        reused K/V back to back, under a block mask (each prompt attends its own prefix and,
        causally, its own tokens: the same computation as each alone, with no padding) → each
        prompt's last logits and its K/V as rows laid out as ``joined``. Why by hand: transformers
        packs sequences only without a cache (its packed-mask detection needs no cache)."""
        from transformers import DynamicCache

        device = self._device()
        lengths = [len(s.prompt_ids) - p for s, (p, _) in zip(seqs, hits, strict=True)]
        kept, run = sum(p for p, _ in hits), sum(lengths)
        ids = [t for s, (p, _) in zip(seqs, hits, strict=True) for t in s.prompt_ids[p:]]
        positions = [q for s, (p, _) in zip(seqs, hits, strict=True)
                     for q in range(p, len(s.prompt_ids))]  # fmt: skip
        mask = torch.zeros((1, 1, run, kept + run), dtype=torch.bool)
        columns, ends = [], []
        past_at, at = 0, 0
        for (p, _), n in zip(hits, lengths, strict=True):
            mask[0, 0, at : at + n, past_at : past_at + p] = True
            block = torch.ones((n, n), dtype=torch.bool).tril()
            mask[0, 0, at : at + n, kept + at : kept + at + n] = block
            columns.append(torch.cat([torch.arange(past_at, past_at + p),
                                      torch.arange(kept + at, kept + at + n)]))  # fmt: skip
            ends.append(at + n - 1)
            past_at, at = past_at + p, at + n
        past = None
        if kept:
            reused = [kv for _, kv in hits if kv is not None]
            past = [tuple(torch.cat([kv[layer][part] for kv in reused], dim=2) for part in (0, 1))
                    for layer in range(len(reused[0]))]  # fmt: skip
        cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
        names = [s.adapter or BASE for s in seqs]
        tokens = None if len(set(names)) == 1 else [n for n, k in zip(names, lengths, strict=True)
                                                      for _ in range(k)]  # fmt: skip
        logits, _ = self._forward(
            seqs[:1], keep=torch.tensor(ends, device=device), tokens=tokens,
            input_ids=torch.tensor([ids], device=device), attention_mask=mask.to(device),
            position_ids=torch.tensor([positions], device=device), **{self._cache_arg: cache},
        )  # fmt: skip
        self.counters["packed_prefills"] += 1
        source = torch.zeros(len(seqs), dtype=torch.long, device=device)
        return logits, self._rows(cache, source, columns, joined)

    def _layers(self, cache: Any) -> tuple[list[Any], list[Any]]:
        """(self-attention layers, cross-attention layers) of a cache."""
        if self._seq2seq:
            return cache.self_attention_cache.layers, cache.cross_attention_cache.layers
        return cache.layers, []

    def _join(
        self, cache: Any, mask: torch.Tensor,
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        """Append new cache rows to the running batch: decoder sides left-padded to the wider
        one, encoder sides (``encoded``: states and mask) right-padded."""
        self._ready_state = None
        if self._cache is None or self._mask is None or self._mask.shape[0] == 0:
            self._cache, self._mask = cache, mask
            self._enc_out, self._enc_mask = encoded if encoded is not None else (None, None)
            return
        mine_self, mine_cross = self._layers(self._cache)
        theirs_self, theirs_cross = self._layers(cache)

        def cat(a: torch.Tensor, b: torch.Tensor, dim: int, left: bool) -> torch.Tensor:
            wide = max(a.shape[dim], b.shape[dim])
            return torch.cat([_pad(a, wide - a.shape[dim], dim, left),
                              _pad(b, wide - b.shape[dim], dim, left)])  # fmt: skip

        # Every new tensor is built before any is stored: a join that fails (out of memory)
        # leaves the running batch as it was, and only the newcomers fail.
        layers = [(mine, cat(mine.keys, theirs.keys, -2, left=True),
                   cat(mine.values, theirs.values, -2, left=True))
                  for mine, theirs in zip(mine_self, theirs_self, strict=True)]  # fmt: skip
        joined_mask = cat(self._mask, mask, 1, left=True)
        enc_out, enc_mask = self._enc_out, self._enc_mask
        if encoded is not None:
            assert enc_out is not None and enc_mask is not None
            layers += [(mine, cat(mine.keys, theirs.keys, -2, left=False),
                        cat(mine.values, theirs.values, -2, left=False))
                       for mine, theirs in zip(mine_cross, theirs_cross, strict=True)]  # fmt: skip
            enc_out = cat(enc_out, encoded[0], 1, left=False)
            enc_mask = cat(enc_mask, encoded[1], 1, left=False)
        for layer, keys, values in layers:
            layer.keys, layer.values = keys, values
        self._mask, self._enc_out, self._enc_mask = joined_mask, enc_out, enc_mask

    def _decode(self, events: list[tuple[Sink, str, Any]]) -> None:
        """One token for every running sequence."""
        assert self._mask is not None
        seqs = list(self._running)
        device = self._device()
        tokens = torch.tensor([[s.last] for s in seqs], dtype=torch.long, device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(seqs), 1))], dim=1)
        decoder_mask, encoder_mask = self._decode_masks()
        if self._seq2seq:
            from transformers.modeling_outputs import BaseModelOutput

            inputs: dict[str, Any] = {
                "encoder_outputs": BaseModelOutput(last_hidden_state=self._enc_out),
                "attention_mask": encoder_mask,
                "decoder_input_ids": tokens,
                "decoder_attention_mask": decoder_mask,
            }
        else:
            positions = torch.tensor([[s.position] for s in seqs], dtype=torch.long,
                                     device=device)  # fmt: skip
            inputs = {"input_ids": tokens, "attention_mask": decoder_mask,
                      "position_ids": positions}  # fmt: skip
        if self._row_positions is not None:
            self._row_positions.rows = [s.position for s in seqs]
        try:
            logits, _ = self._forward(seqs, **inputs, **{self._cache_arg: self._cache})
        finally:
            if self._row_positions is not None:
                self._row_positions.rows = None
        self.decode_sizes[len(seqs)] += 1
        self._advance(seqs, logits, events)

    def _decode_masks(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A decode step's (decoder mask, encoder mask): the 2D masks, or for a model that
        takes them ready-made (``_ready_mask_refusal``) what transformers'
        ``create_causal_mask`` and ``create_bidirectional_mask`` would build from them under
        SDPA (``_ready_mask``), without building them at every step (~19% of a toy llama's
        decode forward on CPU, ~12% of a toy BART's). A decoding token may attend every
        column its row has, and every encoder position its prompt has: each mask is its
        padding as (rows, 1, 1, columns) booleans, or None where no row has padding (SDPA
        then picks its fastest kernel; a BART-family decoder given no mask makes one of ones
        and has transformers find it unpadded, as it would have from the 2D mask: those steps
        save nothing, and no more). Whether rows have padding changes only when rows join or
        leave (a step adds a decoder column every row attends), so they are read then,
        not at every step (on a GPU each read waits for the device)."""
        assert self._mask is not None
        if not self._ready_masks:
            return self._mask, self._enc_mask
        if self._ready_state is None:
            encoder = None if self._enc_mask is None else _ready_mask(self._enc_mask)
            self._ready_state = (not bool(self._mask.all()), encoder)
        padded, encoder = self._ready_state
        return _ready_mask(self._mask, padded), encoder

    def _drop(self, events: list[tuple[Sink, str, Any]]) -> None:
        """Remove finished and cancelled rows from the batch and trim the padding no row
        needs any more (leading decoder columns, trailing encoder columns)."""
        with self._cond:
            keep = [i for i, s in enumerate(self._running) if not s.over]
            self.counters["cancelled"] += sum(
                s.cancelled and not s.done and s.head for s in self._running
            )
            if len(keep) == len(self._running):
                return
            self._running = [self._running[i] for i in keep]
        if not keep:
            self._reset_cache()
            return
        self._reindex(keep)

    def _regroup(self, moved: dict[int, tuple[int, list[int]]]) -> None:
        """After a beam search step: give each search's rows the cache of the rows its beams
        continue (``moved``: a search's first row's id → (its rows in this step, each new
        beam's row among them); a search's rows lie side by side in the batch). A search's
        first step turns its one prefilled row into one row per beam."""
        source: list[int] = []
        running: list[_Seq] = []
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            if id(seq) not in moved:
                source.append(i)
                running.append(seq)
                i += 1
                continue
            now, parents = moved[id(seq)]
            assert seq.rows is not None
            source += [i + (p if now > 1 else 0) for p in parents]
            running += seq.rows
            i += now
        if source == list(range(len(self._running))):
            return
        # a search's rows share their decoder mask, encoder states and cross-attention K/V
        # (one prompt, one length): unless a search grew to its beams, only their own K/V move
        grew = len(source) != len(self._running)
        with self._cond:
            self._running = running
        self._reindex(source, shared=grew)

    def _reindex(self, rows: list[int], shared: bool = True) -> None:
        """The running cache's rows ``rows`` (in that order; a row may repeat), with the padding
        no row needs any more trimmed (leading decoder columns, trailing encoder columns);
        ``shared`` False: only the decoder's self-attention K/V, which alone differ between
        the rows being exchanged."""
        assert self._mask is not None
        index = torch.tensor(rows, dtype=torch.long, device=self._mask.device)
        if not shared:
            for layer in self._layers(self._cache)[0]:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            return
        self._mask, self._ready_state = self._mask.index_select(0, index), None
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        self._mask = self._mask[:, start:]
        self_layers, cross_layers = self._layers(self._cache)
        for layer in self_layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        if self._enc_mask is not None and self._enc_out is not None:
            self._enc_mask = self._enc_mask.index_select(0, index)
            end = int(self._enc_mask.any(dim=0).nonzero().max()) + 1
            self._enc_mask = self._enc_mask[:, :end]
            self._enc_out = self._enc_out.index_select(0, index)[:, :end]
            for layer in cross_layers:
                layer.keys = layer.keys.index_select(0, index)[:, :, :end]
                layer.values = layer.values.index_select(0, index)[:, :, :end]

    def _reset_cache(self) -> None:
        self._cache, self._mask, self._ready_state = None, None, None
        self._enc_out, self._enc_mask = None, None

    # ----- tokens → text ------------------------------------------------------------------------
    def _head(self, prompt_ids: Sequence[int]) -> Sequence[int]:
        """``generate``'s input_ids for a request alone: a causal LM's prompt, an
        encoder-decoder's decoder start token."""
        return [self._start] if self._seq2seq else prompt_ids

    def _request_config(
        self, prompt_ids: Sequence[int], params: SamplingParams, sampled: bool | None = None,
        beams: int = 1,
    ) -> Any:  # fmt: skip
        """The generation config ``generate`` runs this request with: a copy of the model's
        generation_config with the request's budget, stop strings, the served EOS ids and
        sampling settings (``sampled`` None: as the request asks), through generate's own
        preparation of its special tokens."""
        base = self._base()
        config = copy.deepcopy(base.generation_config)
        sampled = not params.greedy if sampled is None else sampled
        start = len(self._head(prompt_ids))
        pad = self.tokenizer.pad_token_id
        config.update(
            do_sample=sampled, num_beams=beams, max_new_tokens=params.max_new_tokens,
            max_length=start + params.max_new_tokens, eos_token_id=self._stop_ids or None,
            pad_token_id=pad if pad is not None else (self._stop_ids or [None])[0],
            temperature=params.temperature if sampled else None,
            top_k=params.top_k if sampled else None, top_p=params.top_p if sampled else None,
            stop_strings=list(params.stop) or None,
        )  # fmt: skip
        # what generate fills in for settings the config leaves unset (length_penalty, ...)
        config.update(**config._get_default_generation_params(), defaults_only=True)
        base._prepare_special_tokens(config, True, device=self._device())
        return config

    def _processors(self, config: Any, prompt_ids: Sequence[int]) -> Any:
        """The logits processors ``generate`` builds from ``config`` for this request alone.

        Why a private transformers method: ``_get_logits_processor`` is generate's only
        builder of that list, with its conditions and order; a copy of it here would drift.
        Each processor reads only the tokens of its row, so applying a request's list to its
        row is what ``generate`` does for that sequence alone."""
        device = self._device()
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        given = {} if self._seq2seq else {"attention_mask": torch.ones_like(ids)}
        start = len(self._head(prompt_ids))
        return self._base()._get_logits_processor(
            config, input_ids_seq_length=start, encoder_input_ids=ids, device=device,
            model_kwargs=given,
        )  # fmt: skip

    def _request_processors(
        self, prompt_ids: Sequence[int], params: SamplingParams, sampled: bool
    ) -> Any:
        """The logits processors ``generate`` builds for this request alone, decoding one token
        per row (with its warpers when ``sampled``)."""
        return self._processors(self._request_config(prompt_ids, params, sampled), prompt_ids)

    def _probe_processors(self) -> tuple[bool, bool]:
        """(whether generate's greedy list holds any processor, whether its sampled list is
        more than the greedy one followed by the temperature, top-k and top-p warpers, which
        the engine applies to rows grouped by equal settings). Which processors the list
        holds follows from the config alone (a request changes only their arguments), so a
        model whose config calls for none builds no list per request."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        probe = SamplingParams(max_new_tokens=2, temperature=0.7, top_k=5, top_p=0.9)
        plain = [type(p) for p in self._request_processors([0], probe, sampled=False)]
        drawn = [type(p) for p in self._request_processors([0], probe, sampled=True)]
        own = drawn != [*plain, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
        return bool(plain), own

    def _seen(self, seq: _Seq) -> torch.Tensor:
        """``generate``'s input_ids for this sequence alone: a causal LM's prompt and
        continuation, an encoder-decoder's decoder start token and continuation (kept in one
        buffer per sequence, extended by the tokens decoded since the last step)."""
        head = self._head(seq.prompt_ids)
        if seq.seen is None:
            seq.seen = torch.empty(
                (1, len(head) + seq.params.max_new_tokens), dtype=torch.long,
                device=self._device(),
            )  # fmt: skip
            seq.seen[0, : len(head)] = torch.tensor(head, dtype=torch.long)
            seq.seen_len = len(head)
        n = len(head) + len(seq.ids)
        if n > seq.seen_len:
            new = seq.ids[seq.seen_len - len(head) :]
            seq.seen[0, seq.seen_len : n] = torch.tensor(new, dtype=torch.long)
            seq.seen_len = n
        return seq.seen[:, :n]

    def _choose(self, seqs: Sequence[_Seq], logits: torch.Tensor) -> list[int]:
        """Each row's scores through generate's processors for its request (where the model's
        generation_config calls for any); then greedy rows take the argmax, and sampled rows
        draw with their own generator, after transformers' temperature / top-k / top-p
        warpers grouped by equal settings (or generate's own warpers for the row, see
        ``_own_warpers``)."""
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        for row, seq in enumerate(seqs):
            if seq.processors is None:
                sampled = self._own_warpers and not seq.params.greedy
                needed = self._any_processors or sampled
                seq.processors = (
                    self._request_processors(seq.prompt_ids, seq.params, sampled) if needed else []
                )
            if seq.processors:
                logits[row : row + 1] = seq.processors(self._seen(seq), logits[row : row + 1])
        chosen = logits.argmax(dim=-1).tolist()
        groups: dict[tuple[float, int, float], list[int]] = {}
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.greedy:
                continue
            if self._own_warpers:  # applied above, with the rest of generate's list
                probs = logits[row].softmax(dim=-1)
                chosen[row] = int(torch.multinomial(probs, 1, generator=seq.rng))
            else:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
        for (temperature, top_k, top_p), rows in groups.items():
            scores = logits[rows]
            scores = TemperatureLogitsWarper(temperature)(None, scores)
            if top_k:
                scores = TopKLogitsWarper(top_k)(None, scores)
            if top_p < 1.0:
                scores = TopPLogitsWarper(top_p)(None, scores)
            probs = scores.softmax(dim=-1)
            for i, row in enumerate(rows):
                draw = torch.multinomial(probs[i], 1, generator=seqs[row].rng)
                chosen[row] = int(draw)
        return chosen

    def _advance(
        self, seqs: Sequence[_Seq], logits: torch.Tensor, events: list[tuple[Sink, str, Any]]
    ) -> None:
        """Take each row's next token from its logits (a beam search's rows: its next beams)."""
        if self._width == 1:
            self._advance_rows(seqs, logits, events)
            return
        searches: dict[int, tuple[_Seq, list[int]]] = {}
        for row, seq in enumerate(seqs):
            lead = seq if seq.rows is None else seq.rows[0]
            searches.setdefault(id(lead), (lead, []))[1].append(row)
        moved: dict[int, tuple[int, list[int]]] = {}
        for lead, rows in searches.values():
            if lead.over:
                continue
            # a search's rows lie side by side: a slice, no index to copy to the device
            assert rows == list(range(rows[0], rows[0] + len(rows))), rows
            try:
                parents = self._beam_step(lead, logits[rows[0] : rows[-1] + 1], events)
            except Exception as err:  # it fails alone; the batch's other rows go on
                log.exception("beam search step failed")
                self._end([lead], err, events)
                continue
            if parents is not None:
                moved[id(lead)] = (len(rows), parents)
        if moved:
            self._regroup(moved)

    def _beam_step(
        self, lead: _Seq, logits: torch.Tensor, events: list[tuple[Sink, str, Any]]
    ) -> list[int] | None:
        """One step of a request's beam search (``actors.beam_search``) over its rows' logits
        → which current row each next beam continues, or None when the search ended (the
        request is finished: its best sequence's text goes out in one piece)."""
        search = lead.beams
        assert search is not None and lead.rows is not None  # set up before its prefill
        parents = search.step(logits)
        if search.done:
            tokens = search.tokens
            ended = next((i for i, t in enumerate(tokens) if t in self._eos), None)
            pad = self.tokenizer.pad_token_id
            # as generate_batch reads generate's rows: up to the first EOS, without padding
            lead.ids = [t for t in tokens[:ended] if t != pad]
            lead.generated = len(lead.ids) + (ended is not None)
            text, stopped = trim_at_stop(self._decoded(lead), lead.params.stop)
            for row in lead.rows[1:]:
                row.done = True
            self._finish(lead, "stop" if ended is not None or stopped else "length", text, events)
            return None
        while len(lead.rows) < search.size:  # the prefilled row becomes one row per beam
            lead.rows.append(dataclasses.replace(lead, ids=[], processors=None, seen=None))
        for row, token in zip(lead.rows, search.last_tokens, strict=True):
            row.last = token
            row.position += 1
        return parents

    def _start_search(self, seq: _Seq) -> None:
        """Set up a request's beam search before its prefill (so that a request whose search
        cannot be built fails before its rows join the batch): generate's config, processors
        and stopping criteria for it alone, and one more criterion that ends it at the
        model's last position, where ``generate`` would fail (``_advance_rows`` ends a
        sequence there too)."""
        from transformers import MaxLengthCriteria, StoppingCriteriaList

        config = self._request_config(seq.prompt_ids, seq.params, beams=seq.width)
        base, head = self._base(), self._head(seq.prompt_ids)
        stops, config.stop_strings = config.stop_strings, None  # the engine's shared one below
        stopping = base._get_stopping_criteria(config, StoppingCriteriaList(),
                                               tokenizer=self.tokenizer)  # fmt: skip
        if stops:
            stopping.append(self._stop_criterion(tuple(stops)))
        if self._max_positions:
            stopping.append(MaxLengthCriteria(self._max_positions + 1))
        processors = self._processors(config, seq.prompt_ids)
        seq.beams = BeamSearch(base, config, processors, stopping, head, seq.rng, self._device())
        seq.rows = [seq]

    def _new_stop_criterion(self, stops: tuple[str, ...]) -> Any:
        """transformers' ``StopStringCriteria`` for ``stops``: the one ``generate`` builds
        for them (``_stop_criterion`` keeps them)."""
        from transformers import StopStringCriteria

        return StopStringCriteria(self.tokenizer, list(stops))

    def _advance_rows(
        self, seqs: Sequence[_Seq], logits: torch.Tensor, events: list[tuple[Sink, str, Any]]
    ) -> None:
        for seq, token in zip(seqs, self._choose(seqs, logits), strict=True):
            if seq.cancelled or seq.done:
                continue
            seq.generated += 1
            seq.last = token
            seq.position += 1
            if token in self._eos:
                self._finish(seq, "stop", self._decoded(seq), events)
                continue
            seq.ids.append(token)
            text = self._text(seq)
            # a held-back piece may hold (the start of) a stop string: look in the whole text
            if seq.params.stop and trim_at_stop(self._decoded(seq) if seq.held else text,
                                                seq.params.stop)[1]:  # fmt: skip
                self._finish(seq, "stop", trim_at_stop(self._decoded(seq), seq.params.stop)[0],
                             events)  # fmt: skip
                continue
            full = seq.generated >= seq.params.max_new_tokens
            if full or (self._max_positions and seq.position >= self._max_positions):
                self._finish(seq, "length", self._decoded(seq), events)
                continue
            if not seq.held:
                self._emit(seq, text, events)

    def _decoded(self, seq: _Seq) -> str:
        """The sequence's text as ``generate``'s caller decodes it: all of its ids at once."""
        return self.tokenizer.decode(seq.ids, skip_special_tokens=True)

    def _text(self, seq: _Seq) -> str:
        """The sequence's text so far, while it runs: what ``_decoded`` gives, without a
        character whose bytes have not all been generated yet, nor a run of byte tokens that
        no other token has closed yet (``byte_runs``). With a streaming decoder only the
        new ids are decoded (tokenizers' ``DecodeStream``, which keeps the few ids before
        them that a byte-level or metaspace decoder needs to place spaces and bytes)."""
        closed = closed_ids(seq.ids, self._byte_runs)
        if self._streaming is None or seq.whole:
            # ``_emit`` waits on a whole text that ends inside a character
            seq.held = closed < len(seq.ids)
            # a held sequence's text is not read (the stop check decodes it whole)
            return "" if seq.held else self._decoded(seq)
        if seq.stream is None:
            seq.stream = self._streaming(skip_special_tokens=True)
        piece = None
        if seq.fed < closed:
            try:
                piece = seq.stream.step(self.tokenizer.backend_tokenizer, seq.ids[seq.fed : closed])
            except Exception:  # tokenizers' "Invalid prefix": new ids changed earlier text
                # Something in this sequence's ids, not the tokenizer as a whole (which the
                # start-up check passed): only this sequence is decoded whole from now on.
                log.warning(
                    "engine: %s's streaming decoder failed on a generated sequence; decoding "
                    "its whole text from now on",
                    type(self.tokenizer).__name__,
                    exc_info=True,
                )
                self.counters["stream_fallbacks"] += 1
                seq.whole = True
                return self._text(seq)
            seq.fed = closed
            if piece:
                seq.text += piece
        # held: the text lags the ids, by an open run of bytes or because the new ids' text
        # ends inside a character (None: where the whole text would end with U+FFFD)
        seq.held = closed < len(seq.ids) or piece is None
        return seq.text

    def _emit(self, seq: _Seq, text: str, events: list[tuple[Sink, str, Any]]) -> None:
        """Hand over the text that can no longer change, by transformers' ``TextStreamer``
        rule (5.x): all of it after a newline or a CJK character, or when the unsent text is
        only letters, marks, digits and spaces (so words stream as they grow); otherwise up to
        the last space (a symbol may start some formatting or be part of a character). Never
        half of a multi-byte character, and never what could be the start of a stop
        sequence."""
        if not text or text.endswith("\ufffd"):
            return
        if text.endswith("\n") or _cjk(text[-1]) or _plain(text[seq.sent :]):
            upto = len(text)
        else:
            upto = text.rfind(" ") + 1
        if seq.params.stop:
            upto = min(upto, len(text) - (max(len(s) for s in seq.params.stop) - 1))
        if upto > seq.sent:
            events.append((seq.sink, "text", text[seq.sent : upto]))
            seq.sent = upto

    def _finish(
        self, seq: _Seq, reason: str, text: str, events: list[tuple[Sink, str, Any]]
    ) -> None:
        if (
            self._streaming
            and not seq.whole
            and seq.sent
            and text[: seq.sent] != seq.text[: seq.sent]
        ):
            # What was streamed is not how the whole text decodes: this tokenizer's streaming
            # decoder does not match its decode. Later sequences decode whole texts.
            log.warning(
                "engine: %s decodes token by token differently from all at once; streamed "
                "text may not join to the completion's, decoding whole texts from now on",
                type(self.tokenizer).__name__,
            )
            self._streaming = None
        if len(text) > seq.sent:
            events.append((seq.sink, "text", text[seq.sent :]))
            seq.sent = len(text)
        done = Completion(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=seq.generated,
            token_ids=list(seq.ids),
        )
        events.append((seq.sink, "done", done))
        seq.done = True  # leaves the batch at the next _drop
        self.counters["finished"] += 1


@dataclasses.dataclass(frozen=True)
class ByteRuns:
    """A byte-fallback tokenizer's ids that do not end a run of bytes (``byte_runs``): its
    byte tokens, the special tokens ``skip_special_tokens`` drops from between them, and any
    id from ``limit`` on (beyond the tokenizer, which ``decode`` drops too: a model's
    embedding matrix may be larger than its tokenizer)."""

    ids: frozenset[int]
    limit: int

    def closed(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` lie before an open run of bytes at their end: the ids whose
        text no later id can change."""
        end = len(ids)
        while end and (ids[end - 1] in self.ids or ids[end - 1] >= self.limit):
            end -= 1
        return end


def byte_runs(tokenizer: Any) -> ByteRuns | None:
    """For a tokenizer with byte fallback (``<0xNN>`` tokens for what its vocabulary lacks:
    SentencePiece's BPE and Unigram layouts), which ids extend a run of bytes; None for any
    other tokenizer.

    Its decoder turns each run of byte tokens into text as a whole, and every byte of a run
    that is not valid UTF-8 into U+FFFD, so one more byte can change characters decoded
    before it; the text of a run is final once another token follows it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # the decoder step that does it (tokenizers' Unigram does not expose its model's flag)
    if not getattr(backend.model, "byte_fallback", False) and "ByteFallback" not in repr(
        backend.decoder
    ):
        return None
    vocab = backend.get_vocab()
    ids = {vocab[t] for t in (f"<0x{b:02X}>" for b in range(256)) if t in vocab}
    ids |= set(getattr(tokenizer, "all_special_ids", None) or ())
    # special added tokens the config does not name (chat and tool-call markers, say)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {i for i, token in added.items() if getattr(token, "special", False)}
    return ByteRuns(frozenset(ids), backend.get_vocab_size(with_added_tokens=True))


def closed_ids(ids: Sequence[int], runs: ByteRuns | None) -> int:
    """How many of ``ids`` lie before an open run of bytes at their end (all of them unless
    the tokenizer has byte fallback, ``byte_runs``)."""
    return len(ids) if runs is None else runs.closed(ids)


def _stream_decoder(tokenizer: Any, runs: ByteRuns | None = None) -> Any:
    """tokenizers' ``DecodeStream`` class, where decoding ``tokenizer``'s ids a few at a time
    as the engine does (``closed_ids``: a run of bytes once it is closed) gives what its
    ``decode`` gives (minus a character whose bytes are not all there yet): a fast tokenizer
    whose ``decode`` does nothing of its own on top (a clean-up of spaces, say). Checked on a
    sample of mixed text and of every id, decoded both ways after each id. None otherwise."""
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # spaces before punctuation and contractions, which a clean-up of spaces would remove
    sample = "Hello , world !\n  Ünïcödé 日本語 🙂\tx = (1 + 2) ; it 's done . I 'm n't ?\n\nNext"
    try:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        whole = len(ids)
        ids += list(range(0, len(tokenizer), max(1, len(tokenizer) // 200)))
        stream, text, fed = DecodeStream(skip_special_tokens=True), "", 0
        for n in range(1, len(ids) + 1):
            closed = closed_ids(ids[:n], runs)
            if closed > fed:
                text += stream.step(backend, ids[fed:closed]) or ""
                fed = closed
            decoded = tokenizer.decode(ids[:n], skip_special_tokens=True)
            # a prefix of the whole text, and all of it once the sample's characters are
            if not decoded.startswith(text) or (n == whole and decoded != text):
                return None
    except Exception:  # a decoder the stream cannot drive: decode whole texts
        return None
    return DecodeStream


def _plain_attention(config: Any) -> bool:
    """Full causal attention placed by ``position_ids``: no sliding window, no chunked
    attention, no layer of another kind, no ALiBi (whose positions come from the mask)."""
    if config is None:
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False
    if getattr(config, "attention_chunk_size", None) is not None:
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    alibi = getattr(config, "alibi", False) or getattr(config, "model_type", "") in (
        "bloom",
        "mpt",
        "jais",
    )
    return not alibi


def _ready_mask(mask: torch.Tensor, padded: bool | None = None) -> torch.Tensor | None:
    """A decoding query's 2D padding mask as the 4D one transformers builds from it under
    SDPA (a one-token query attends every column its row has): its (rows, 1, 1, columns)
    booleans, or None where no row has padding (``padded``: whether one has, when known)."""
    if padded is None:
        padded = not bool(mask.all())
    return mask.bool()[:, None, None, :] if padded else None


def _ready_mask_refusal(
    model: Any, cache_arg: str, device: torch.device, start: int | None = None
) -> str | None:
    """Why an SDPA model's decode steps may not be given their masks as
    ``ContinuousBatchingEngine._decode_masks`` builds them instead of the 2D padding masks, or None
    where they may (``start``: an encoder-decoder's decoder start token; None for a causal
    LM). Checked on the model, not assumed (a forward that reads a 4D mask otherwise, as
    transformers' older float-mask code did, or that uses a 2D mask for more than the
    attention mask, fails it): one decode step of a padded and of an unpadded pair of rows
    (an encoder-decoder's prompts padded with them), each both ways, must give the same
    logits. A few tokens' forwards, once. Only transformers' own model classes: a remote-code
    model may window its attention under a setting of its own, which four tokens would not
    show and a ready mask would skip."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    module = type(model).__module__
    if not module.startswith("transformers."):
        return f"{module} is not one of transformers' own models"

    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
        ids = (torch.arange(6, device=device).view(2, 3) * 7 + 1) % vocab
        step = (torch.tensor([[9], [10]], device=device)) % vocab
        ones = torch.ones((2, 4), dtype=torch.long, device=device)
        padded = ones.clone()
        padded[0, 0] = 0
        with torch.inference_mode():
            for mask in (padded, ones):
                logits = []
                if start is None:
                    positions = (mask.cumsum(1) - 1).clamp(min=0)
                    cache: Any = DynamicCache()
                    model(input_ids=ids, attention_mask=mask[:, :3],
                          position_ids=positions[:, :3], use_cache=True,
                          **{cache_arg: cache})  # fmt: skip
                    for given in (mask, _ready_mask(mask)):
                        out = model(input_ids=step, attention_mask=given,
                                    position_ids=positions[:, 3:], use_cache=True,
                                    **{cache_arg: cache})  # fmt: skip
                        cache.crop(-1)
                        logits.append(out.logits[:, -1].float())
                else:  # the prompts right-padded as the engine pads them, the decoder left
                    prompts = mask[:, :3].flip(1)
                    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
                    first = model(input_ids=ids, attention_mask=prompts,
                                  decoder_input_ids=ids.clone().fill_(start),
                                  decoder_attention_mask=mask[:, :3], use_cache=True,
                                  **{cache_arg: cache})  # fmt: skip
                    encoded = BaseModelOutput(last_hidden_state=first.encoder_last_hidden_state)
                    ready = (_ready_mask(mask), _ready_mask(prompts))
                    for decoder, encoder in ((mask, prompts), ready):
                        out = model(encoder_outputs=encoded, attention_mask=encoder,
                                    decoder_input_ids=step, decoder_attention_mask=decoder,
                                    use_cache=True, **{cache_arg: cache})  # fmt: skip
                        cache.crop(-1)
                        logits.append(out.logits[:, -1].float())
                if not torch.allclose(*logits, rtol=1e-4, atol=1e-5):
                    kind = "padded" if not bool(mask.all()) else "unpadded"
                    return f"its logits differ with ready masks ({kind} rows)"
    except Exception as err:  # a forward that refuses a 4D mask, a cache it cannot crop
        return f"a decode step with ready masks failed: {type(err).__name__}: {err}"
    return None


def _decoder_start(model: Any) -> int:
    """The token an encoder-decoder's decoder starts from (as ``generate`` picks it)."""
    generation, config = getattr(model, "generation_config", None), model.config
    start = None
    for source in (generation, config):  # generate's order: generation_config first
        for key in ("decoder_start_token_id", "bos_token_id"):
            if start is None:
                start = getattr(source, key, None)
    if start is None:
        raise ValueError(
            "continuous batching: the model's config has no decoder_start_token_id; set it in "
            "config.json"
        )
    return int(start)


def wait_result(engine: Engine, prompt: str, params: SamplingParams, adapter: str | None = None,
                timeout_s: float = 600.0) -> Completion:  # fmt: skip
    """Submit and block until the completion (for callers without an event loop: tests,
    ``taskray evaluate``)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def sink(kind: str, payload: Any) -> None:
        if kind in ("done", "error"):
            box[kind] = payload
            done.set()

    engine.submit(prompt, params, adapter, sink)
    if not done.wait(timeout_s):
        raise TimeoutError(f"no completion within {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["done"]
