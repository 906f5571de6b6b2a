"""The continuous-batching engine's decode masks (no Ray): where an SDPA model takes them
ready-made (causal LMs and encoder-decoders), every decode step's masks equal what
transformers' ``create_causal_mask`` and ``create_bidirectional_mask`` build from the engine's
2D padding masks (None without padding, booleans over the padded columns otherwise) while rows
join and leave, and greedy output still equals ``generate``; the start-up check refuses models
that read 4D masks otherwise (eager attention) and classes of their own, and a refused model
keeps 2D masks."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

import actors.engine as engine_module
from actors.engine import ContinuousBatchingEngine, _ready_mask_refusal
from tests.actors.test_engine import (
    NEW,
    PROMPTS,
    _gpt2,
    _llama,
    _seq2seq,
    _staggered_joins,
    reference,
)


def _watch_decode_masks(engine: ContinuousBatchingEngine) -> tuple[list[tuple[str, Any, Any]], Any]:
    """Record each decode step's ("decoder" or "encoder", mask handed to the model, mask
    transformers builds from the engine's 2D mask for that step) → (those, the hook's
    handle)."""
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    model = engine._base()
    seen: list[tuple[str, Any, Any]] = []

    def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get(engine._cache_arg)
        if cache is None or cache is not engine._cache:  # a prefill (its own cache)
            return
        assert engine._mask is not None
        rows = engine._mask.shape[0]
        if engine._seq2seq:
            config = model.get_decoder().config
            embeds = torch.zeros((rows, 1, config.d_model))
            # positional: transformers 5.25 renamed its cache argument
            built = create_causal_mask(config, embeds, engine._mask, cache.self_attention_cache)
            seen.append(("decoder", kwargs.get("decoder_attention_mask"), built))
            encoded = kwargs["encoder_outputs"].last_hidden_state
            built = create_bidirectional_mask(config, embeds, engine._enc_mask, encoded)
            seen.append(("encoder", kwargs.get("attention_mask"), built))
            return
        embeds = torch.zeros((rows, 1, model.config.hidden_size))
        built = create_causal_mask(
            model.config, embeds, engine._mask, cache, kwargs["position_ids"]
        )
        seen.append(("decoder", kwargs.get("attention_mask"), built))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def _run_watched(
    model: Any, tok: Any, lengths: list[int]
) -> tuple[bool, list[tuple[str, Any, Any]]]:
    """Greedy requests through a new engine, each joining a batch already running
    (``_staggered_joins``: rows of different widths; shorter budgets leave first), each output
    checked against ``generate`` alone → (whether the engine took ready masks, every decode
    step's (side, mask handed to the model, mask transformers builds))."""
    engine = ContinuousBatchingEngine(model, tok)
    seen, handle = _watch_decode_masks(engine)
    try:
        for i, done in enumerate(_staggered_joins(engine, lengths)):
            ids = done.token_ids
            assert ids == reference(model, tok, PROMPTS[i], lengths[i])[: len(ids)], PROMPTS[i]
    finally:
        handle.remove()
        engine.close()
    return engine._ready_masks, seen


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "bart"])
def test_decode_masks_equal_what_transformers_builds_and_output_stays_exact(kind):
    builders = {"llama": _llama, "gpt2": _gpt2, "t5": _seq2seq,
                "bart": lambda: _seq2seq("bart", position_scale=10.0)}  # fmt: skip
    model, tok = builders[kind]()
    ready, seen = _run_watched(model, tok, [NEW, 6, NEW, 12, 3, NEW])
    assert ready, "an SDPA model should take ready decode masks"
    sides = ["decoder", "encoder"] if model.config.is_encoder_decoder else ["decoder"]
    for side in sides:  # steps with padding and steps without ran, on each side
        built = [b for s, _, b in seen if s == side]
        assert len(built) >= NEW and any(b is None for b in built), side
        assert any(b is not None for b in built), side
    for _, given, built in seen:
        if built is None:
            assert given is None
        else:
            assert given is not None and given.dtype == torch.bool
            assert given.shape == built.shape and torch.equal(given, built)


def test_the_start_up_check_refuses_eager_attention_and_remote_code_models():
    """Eager attention adds a 4D mask to its scores as numbers: a boolean one changes its
    logits. A model class of its own (remote code) may window its attention under a setting
    the check cannot see. The same llama under SDPA passes."""
    from transformers import LlamaForCausalLM

    model, _ = _llama()
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cpu = torch.device("cpu")
    assert _ready_mask_refusal(model, arg, cpu) is None
    model.set_attn_implementation("eager")
    assert "logits differ" in (_ready_mask_refusal(model, arg, cpu) or "")
    model.set_attn_implementation("sdpa")

    class Remote(LlamaForCausalLM):
        pass

    remote = Remote(model.config).eval()
    assert "not one of transformers' own" in (_ready_mask_refusal(remote, arg, cpu) or "")


def test_a_refused_model_gets_2d_masks_and_stays_exact(monkeypatch):
    model, tok = _llama()
    monkeypatch.setattr(engine_module, "_ready_mask_refusal", lambda *_: "refused by the test")
    ready, seen = _run_watched(model, tok, [NEW, 6, NEW])
    assert not ready
    assert seen and all(given is not None and given.dim() == 2 for _, given, _ in seen)
