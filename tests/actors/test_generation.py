"""The static generation path (``actors.generation``): what a generator replica runs for models
the continuous-batching engine refuses (a decoding strategy it does not run, an encoder-decoder
family it has no positions for), and the reference the engine's beam search is checked
against. ``generate_batch`` and ``stream_generate`` keep the model's own ``generation_config``
(beams included), and report the same text, finish reason and token counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from actors.generation import Completion, SamplingParams, generate_batch, stream_generate
from tests.actors.test_engine import PROMPTS, _llama, _seq2seq


def _static_bart(beams: int) -> tuple[Any, Any]:
    """A tiny BART configured as published BART checkpoints are: the decoder starting from the
    EOS token, an n-gram ban, and (``beams`` > 1) beam search."""
    model, tok = _seq2seq("bart", position_scale=10.0)
    model.config.decoder_start_token_id = tok.eos_token_id
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.num_beams = beams
    return model, tok


def _alone(model: Any, tok: Any, prompt: str, new: int) -> list[int]:
    """The model's own ``generate`` (its generation_config, beams included), new ids up to EOS."""
    tok.padding_side = "right" if model.config.is_encoder_decoder else "left"
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, pad_token_id=tok.pad_token_id)
    ids = out[0, 1 if model.config.is_encoder_decoder else enc["input_ids"].shape[1] :].tolist()
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


@pytest.mark.parametrize("kind", ["llama", "ngram-bart", "beam-bart"])
def test_batched_and_streamed_static_generation_report_what_generate_made(kind):
    """For one prompt, ``generate_batch`` gives ``generate``'s own ids, text, finish reason and
    token count, and ``stream_generate``'s pieces and completion say the same (a beam search
    streams its text in one piece at the end; the decoder's start token is not counted even
    when it is the EOS)."""
    models = {"llama": _llama, "ngram-bart": lambda: _static_bart(1),
              "beam-bart": lambda: _static_bart(3)}  # fmt: skip
    model, tok = models[kind]()
    seq2seq = kind != "llama"
    for new in (4, 12):
        params = SamplingParams(max_new_tokens=new)
        for prompt in PROMPTS[:3]:
            want = _alone(model, tok, prompt, new)
            (done,) = generate_batch(model, tok, [prompt], params, seq2seq)
            assert done.token_ids == want
            assert done.text == tok.decode(want, skip_special_tokens=True)
            ended = len(want) < new
            assert done.finish_reason == ("stop" if ended else "length")
            assert done.completion_tokens == len(want) + int(ended)
            items = list(stream_generate(model, tok, prompt, params, seq2seq))
            *pieces, last = items
            assert isinstance(last, Completion)
            assert "".join(pieces) == last.text == done.text
            assert last.finish_reason == done.finish_reason, (prompt, new)
            assert last.completion_tokens == done.completion_tokens, (prompt, new)


def test_assisted_decoding_runs_one_prompt_per_generate_call():
    """Prompt lookup (assisted decoding) takes one prompt per ``generate`` call: a batch of
    three runs them one at a time instead of failing, each exactly greedy."""
    model, tok = _llama()
    params = SamplingParams(max_new_tokens=10)
    greedy = [generate_batch(model, tok, [p], params, False)[0] for p in PROMPTS[:3]]
    model.generation_config.prompt_lookup_num_tokens = 3
    looked = generate_batch(model, tok, PROMPTS[:3], params, False)
    assert [c.token_ids for c in looked] == [c.token_ids for c in greedy]


def test_top_k_zero_samples_from_the_whole_vocabulary():
    """A request's ``top_k`` 0 means no top-k cut, as the engine reads it (``generate``'s
    default for a top_k it is not given is 50): the static path samples what ``generate``
    samples with ``top_k=0``."""
    from tests.actors.test_engine import reference

    model, tok = _llama()
    params = SamplingParams(max_new_tokens=32, temperature=8.0, top_k=0, seed=3)
    (done,) = generate_batch(model, tok, [PROMPTS[0]], params, False)
    assert done.token_ids == reference(model, tok, PROMPTS[0], sampled=params)
