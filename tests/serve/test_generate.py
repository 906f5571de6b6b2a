"""The generator through Ray Serve on loopback: OpenAI-compatible routes (with the official
`openai` package), streaming, multi-LoRA with LRU eviction, greedy equality with in-process
`generate` (a causal LM and a BART encoder-decoder under continuous batching, a T5 configured
for beam search on the engine's beam rows, a prompt-lookup llama on static batches), stop
sequences, limits, and generative task routes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import app_config, deployed_app, lora_adapter, tiny_lm_dir, tiny_seq2seq_dir

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "gen-key-0123456789"
PROMPT = "Write a note about the train timetable."
MAX_NEW = 12
LONG = 1500  # new tokens of a request that runs for seconds (2048 positions)


@pytest.fixture(scope="module")
def generator_app(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    base = tiny_lm_dir(tmp / "base")
    adapters = {f"style-{c}": str(lora_adapter(base, tmp / f"lora-{c}", seed)) for c, seed in
                (("a", 1), ("b", 2), ("c", 3))}  # fmt: skip
    from transformers import GenerationConfig

    lookup = tiny_lm_dir(tmp / "lookup")  # the same weights, configured for prompt lookup
    generation = GenerationConfig.from_pretrained(lookup)
    generation.prompt_lookup_num_tokens = 3
    generation.save_pretrained(lookup)
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY)
    args = {
        "api_key_file": str(key_file),
        "limits": {"max_input_tokens": 200, "max_new_tokens": LONG},
        "models": [
            {
                "name": "tiny-lm",
                "bundle": str(base),
                "adapters": adapters,
                "max_adapters": 2,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.05,
                "generation": {"max_new_tokens": MAX_NEW},
            },
            {  # the same weights behind a one-slot, one-seat scheduler with a small KV budget
                "name": "narrow-lm",
                "bundle": str(base),
                "generation": {"max_new_tokens": MAX_NEW},
                "scheduler": {"max_running": 1, "max_queued": 1, "max_cached_tokens": 1600},
            },
            {  # a T5 configured for beam search, as many published summarizers and
                # translators are: the engine runs each request's beams as rows
                "name": "tiny-t5",
                "bundle": str(tiny_seq2seq_dir(tmp / "t5", beams=3)),
                "num_cpus": 0.2,
                "generation": {"max_new_tokens": MAX_NEW},
            },
            {  # assisted decoding (prompt lookup), which the engine does not run: static
                # generate does
                "name": "tiny-lookup",
                "bundle": str(lookup),
                "num_cpus": 0.2,
                "batch_wait_timeout_s": 0.5,
                "generation": {"max_new_tokens": MAX_NEW},
            },
            {  # an encoder-decoder on the engine: a BART, whose decoder positions are absolute
                "name": "tiny-bart",
                "bundle": str(tiny_seq2seq_dir(tmp / "bart", "bart")),
                "num_cpus": 0.2,
                "generation": {"max_new_tokens": MAX_NEW},
            },
        ],
    }
    with deployed_app(app_config(args), tmp, timeout_s=180) as url:
        yield url, base


def _post(url: str, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def _stream_text(url: str, payload: dict) -> str:
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        events = [e[6:] for e in response.iter_lines() if e.startswith("data: {")]
    return "".join(json.loads(e)["choices"][0]["text"] for e in events)


def _reference(base: Path, prompt: str, adapter: str | None = None, new: int = MAX_NEW) -> str:
    """In-process greedy ``generate`` on the same weights and prompt (a causal LM's or an
    encoder-decoder's, as the directory's config says)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    seq2seq = AutoConfig.from_pretrained(base).is_encoder_decoder
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(base).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    new_ids = out[0, 0 if seq2seq else ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tok.eos_token_id)]
    return tok.decode(new_ids, skip_special_tokens=True)


def test_greedy_completion_equals_in_process_generate(generator_app):
    url, base = generator_app
    response = _post(url, "/v1/completions", {"model": "tiny-lm", "prompt": PROMPT})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == _reference(base, PROMPT)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_package_chat_stream_and_models(generator_app):
    from openai import OpenAI

    url, _ = generator_app
    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Say something about espresso."}]
    chat = client.chat.completions.create(model="tiny-lm", messages=messages)
    text = chat.choices[0].message.content
    assert isinstance(text, str) and chat.choices[0].finish_reason in ("stop", "length")
    pieces = []
    for event in client.chat.completions.create(model="tiny-lm", messages=messages, stream=True):
        if event.choices and event.choices[0].delta.content:
            pieces.append(event.choices[0].delta.content)
    # Greedy decoding: the stream carries exactly the non-streamed answer.
    assert "".join(pieces) == text
    ids = {m.id for m in client.models.list().data}
    assert {"tiny-lm", "style-a", "style-b", "style-c"} <= ids


def test_stream_is_server_sent_events_ending_with_done(generator_app):
    url, base = generator_app
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "tiny-lm", "prompt": PROMPT, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == _reference(base, PROMPT)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_adapters_differ_evict_lru_and_unknown_is_404(generator_app):
    from ray import serve

    url, base = generator_app
    outputs = {}
    for name in ("style-a", "style-b", "style-c"):
        r = _post(url, "/v1/completions", {"model": name, "prompt": PROMPT})
        assert r.status_code == 200, r.text
        outputs[name] = r.json()["choices"][0]["text"]
    base_text = _post(url, "/v1/completions", {"model": "tiny-lm", "prompt": PROMPT}).json()
    assert outputs["style-a"] != outputs["style-b"]
    assert outputs["style-a"] != base_text["choices"][0]["text"]
    # The adapter path matches PEFT in-process, token for token.
    assert outputs["style-b"] == _reference(base, PROMPT, str(base.parent / "lora-b"))
    handle = serve.get_deployment_handle("generator-tiny-lm", app_name="taskray")
    held = handle.stats.remote().result()["adapters"]
    assert sorted(held) == ["style-b", "style-c"], held  # max_adapters=2: a was evicted
    # Back to a: loaded again, and it answers as before.
    again = _post(url, "/v1/completions", {"model": "style-a", "prompt": PROMPT}).json()
    assert again["choices"][0]["text"] == outputs["style-a"]
    missing = _post(url, "/v1/completions", {"model": "style-z", "prompt": PROMPT})
    assert missing.status_code == 404
    assert "style-z" in missing.json()["error"]["message"]


def test_stop_sequence_and_seeded_sampling(generator_app):
    url, base = generator_app
    full = _reference(base, PROMPT)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if stop.strip():
        r = _post(url, "/v1/completions", {"model": "tiny-lm", "prompt": PROMPT, "stop": [stop]})
        choice = r.json()["choices"][0]
        assert choice["text"] == full[: full.index(stop)]
        assert choice["finish_reason"] == "stop"
    body = {"model": "tiny-lm", "prompt": PROMPT, "temperature": 1.0, "seed": 7}
    first = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    assert _post(url, "/v1/completions", body).json()["choices"][0]["text"] == first


def _engine(name: str) -> dict:
    from ray import serve

    handle = serve.get_deployment_handle(f"generator-{name}", app_name="taskray")
    return handle.stats.remote().result(timeout_s=30)["engine"]


def _wait_engine(name: str, done: Any, timeout_s: float = 30.0) -> dict:
    """Poll the generator's engine figures until ``done(figures)`` or the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = _engine(name)
        if done(figures) or time.monotonic() > deadline:
            return figures
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(generator_app):
    url, _ = generator_app
    before = _engine("tiny-lm")
    body = {"model": "tiny-lm", "prompt": PROMPT, "stream": True, "max_tokens": LONG}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        lines = response.iter_lines()
        assert any('"text": "' in line and '"text": ""' not in line for line in lines)
        # leaving the block closes the connection after the first text chunk
    after = _wait_engine(
        "tiny-lm",
        lambda f: f["running"] == 0 and f.get("cancelled", 0) > before.get("cancelled", 0),
    )
    assert after["running"] == 0, after
    # cancelled, not finished: it left the batch long before its 1500 tokens
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1, after
    assert after.get("finished", 0) == before.get("finished", 0), after


def test_full_queue_answers_503_with_retry_after(generator_app):
    """``narrow-lm`` runs one sequence and queues one more: requests past that are refused
    with 503 + Retry-After (which ``Client`` retries), streamed ones before any event is
    sent, and the replica serves on.

    Each burst sends six long requests at once rather than catching the engine in a given
    state: whichever arrive while one runs and one waits must be refused, however the
    machine's load spreads their arrival (a poll for "one running, one waiting" could miss
    that window on a loaded 2-core machine)."""
    url, _ = generator_app
    body = {"model": "narrow-lm", "prompt": PROMPT, "max_tokens": LONG}
    for stream in (False, True):
        before = _engine("narrow-lm").get("refused", 0)
        burst = [{**body, "stream": stream}] * 6
        with ThreadPoolExecutor(len(burst)) as pool:
            answers = list(pool.map(lambda b: _post(url, "/v1/completions", b), burst))
        refused = [a for a in answers if a.status_code == 503]
        assert refused, [a.status_code for a in answers]
        assert all(a.status_code == 200 for a in answers if a not in refused)
        for answer in refused:
            assert answer.headers["Retry-After"] == "1"
            assert "max_queued=1" in answer.json()["error"]["message"]
            assert "data:" not in answer.text  # a streamed refusal comes before any event
        after = _wait_engine("narrow-lm", lambda f: f["running"] == f["waiting"] == 0)
        assert after["refused"] == before + len(refused), after
        assert after["running"] == 0 and after["waiting"] == 0, after
    ok = _post(url, "/v1/completions", {"model": "narrow-lm", "prompt": PROMPT})
    assert ok.status_code == 200


def _burst(url: str, engine_of: str, payloads: list[dict]) -> list[str]:
    """Send ``payloads`` to ``/v1/completions`` all at once (streamed or not, as each says)
    and return their texts, after checking that ``engine_of``'s engine ran some decode step
    with more than one of them (they shared the running batch)."""

    def run(payload: dict) -> str:
        if payload["stream"]:
            return _stream_text(url, payload)
        return _post(url, "/v1/completions", payload).json()["choices"][0]["text"]

    before = _engine(engine_of)["decode_batch_sizes"]
    with ThreadPoolExecutor(len(payloads)) as pool:
        texts = list(pool.map(run, payloads))
    after = _engine(engine_of)["decode_batch_sizes"]
    grown = [int(k) for k, v in after.items() if v > before.get(k, 0)]
    assert max(grown) > 1, (before, after)  # they did share decode steps
    return texts


def test_mixed_batch_greedy_equals_generate_for_each_adapter(generator_app):
    """Base and two adapters, streamed and not, sent together so they share the running
    batch: each text equals in-process ``generate`` with that adapter alone."""
    url, base = generator_app
    names = ["tiny-lm", "style-a", "style-b"]  # style-a and style-b: Serve holds two at most
    jobs = [(n, stream) for n in names for stream in (False, True)]
    for name in names[1:]:  # load both adapters before the burst
        assert _post(url, "/v1/completions", {"model": name, "prompt": "hi"}).status_code == 200

    payloads = [{"model": name, "prompt": PROMPT, "stream": stream} for name, stream in jobs]
    texts = _burst(url, "tiny-lm", payloads)
    for (name, _), text in zip(jobs, texts, strict=True):
        adapter = None if name == "tiny-lm" else str(base.parent / f"lora-{name[-1]}")
        assert text == _reference(base, PROMPT, adapter), name


def test_encoder_decoder_requests_share_the_running_batch_and_equal_generate(generator_app):
    """A BART behind the same routes runs on the continuous-batching engine: streamed and
    non-streamed requests with different token budgets, sent together, share decode steps, and
    each text equals in-process seq2seq ``generate`` alone (the T5 family is tested so in
    process, ``tests/actors/test_engine.py``)."""
    url, base = generator_app
    kind = "bart"
    prompts = [PROMPT, "Translate to French: the train is late.", "Summarize: rain all week."]
    # long enough that six requests sent together overlap on a loaded machine
    jobs = [(p, stream, n) for p, n in zip(prompts, (48, 24, 36), strict=True)
            for stream in (False, True)]  # fmt: skip

    payloads = [{"model": f"tiny-{kind}", "prompt": p, "max_tokens": n, "stream": stream}
                for p, stream, n in jobs]  # fmt: skip
    texts = _burst(url, f"tiny-{kind}", payloads)
    for (prompt, stream, new), text in zip(jobs, texts, strict=True):
        assert text == _reference(base.parent / kind, prompt, new=new), (prompt, stream)
    assert any(texts)


def _one_piece_stream(url: str, payload: dict) -> list[dict]:
    """A stream's choices, checked to end with [DONE]."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {**payload, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers=headers) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        events = [e[6:] for e in response.iter_lines() if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e)["choices"][0] for e in events[:-1]]


def test_a_beam_search_model_runs_its_beams_on_the_engine(generator_app):
    """A model whose generation_config asks for beam search runs on the continuous-batching
    engine, each request's beams as rows of the running batch: requests sent together share
    decode steps, a stream carries the search's text in one piece when it ends (no beam is
    final before), and every text equals in-process ``generate`` with the model's own
    configuration."""
    url, base = generator_app
    prompts = [PROMPT, "Translate to French: the train is late.", "Summarize: rain all week."]
    payloads = [{"model": "tiny-t5", "prompt": p, "max_tokens": 16, "stream": False}
                for p in prompts]  # fmt: skip
    before = _engine("tiny-t5")["decode_batch_sizes"]
    with ThreadPoolExecutor(len(payloads)) as pool:
        texts = list(pool.map(lambda b: _post(url, "/v1/completions", b), payloads))
    after = _engine("tiny-t5")["decode_batch_sizes"]
    grown = [int(k) for k, v in after.items() if v > before.get(k, 0)]
    assert max(grown) > 3, (before, after)  # more rows than one search's three beams
    wants = [_reference(base.parent / "t5", p, new=16) for p in prompts]
    assert len(set(wants)) == len(wants)  # each prompt has its own text
    for response, want in zip(texts, wants, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == want

    pieces = _one_piece_stream(url, payloads[1])
    assert [p["text"] for p in pieces if p["text"]] == [wants[1]]  # one piece, at the end
    assert pieces[-1]["finish_reason"] in ("stop", "length")


def test_a_strategy_the_engine_does_not_run_is_served_by_static_generate(generator_app):
    """A model whose generation_config selects assisted decoding (prompt lookup) keeps static
    ``generate``: non-streamed requests sent together share one batch (``@serve.batch``; generate
    takes them one prompt at a time), a stream streams, and every text equals in-process
    ``generate`` with the model's own configuration."""
    from ray import serve

    url, base = generator_app
    handle = serve.get_deployment_handle("generator-tiny-lookup", app_name="taskray")
    before = handle.stats.remote().result(timeout_s=30)
    assert "engine" not in before  # static batches, not continuous batching
    prompts = [PROMPT, "a b c a b c a b", "Summarize: rain all week."]
    payloads = [{"model": "tiny-lookup", "prompt": p, "stream": False} for p in prompts]
    with ThreadPoolExecutor(len(payloads)) as pool:
        texts = list(pool.map(lambda b: _post(url, "/v1/completions", b), payloads))
    after = handle.stats.remote().result(timeout_s=30)["batch_sizes"]
    grown = [int(k) for k, v in after.items() if v > before["batch_sizes"].get(k, 0)]
    assert max(grown) > 1, (before, after)  # they shared a batch
    wants = [_reference(base.parent / "lookup", p) for p in prompts]
    assert wants == [_reference(base, p) for p in prompts]  # prompt lookup is exact greedy
    for response, want in zip(texts, wants, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == want
    pieces = _one_piece_stream(url, payloads[1])
    assert "".join(p["text"] for p in pieces) == wants[1]


def test_generative_task_route(generator_app):
    url, base = generator_app
    r = _post(url, "/v1/tasks/generation", {"input": {"prompt": PROMPT}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "generation" and body["model"] == "tiny-lm"
    # The task's decode is applied (the generation family strips the separating space).
    assert body["predictions"][0]["text"] == _reference(base, PROMPT).strip()


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/completions", {"model": "tiny-lm", "prompt": PROMPT, "max_tokens": 9999}, 422,
         "limits.max_new_tokens"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": "word " * 400}, 413,
         "limits.max_input_tokens"),
        ("/v1/completions", {"model": "narrow-lm", "prompt": "word " * 30, "max_tokens": LONG},
         413, "max_cached_tokens=1600"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": 7}, 422, "prompt"),
        ("/v1/completions", {"prompt": PROMPT}, 422, "model"),
        ("/v1/chat/completions", {"model": "tiny-lm", "messages": []}, 422, "messages"),
        ("/v1/chat/completions", {"model": "tiny-lm", "messages": [{"role": "pirate",
         "content": "arr"}]}, 422, "messages.0.role"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": PROMPT, "temperature": -1}, 422,
         "temperature"),
        ("/v1/tasks/generation", {"input": {"completion": "x"}}, 422, "input.prompt"),
        ("/v1/tasks/teleportation", {"input": {"text": "x"}}, 404, "unknown task"),
        ("/v1/tasks/ner", {"input": {"text": "x"}}, 404, "no model serves task 'ner'"),
    ],
)  # fmt: skip
def test_bad_generation_requests_get_4xx(generator_app, path, body, status, fragment):
    url, _ = generator_app
    response = _post(url, path, body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert _post(url, "/v1/completions", {"model": "tiny-lm", "prompt": PROMPT}).status_code == 200


def test_auth_required_on_generation_routes(generator_app):
    url, _ = generator_app
    body = {"model": "tiny-lm", "prompt": PROMPT}
    assert _post(url, "/v1/completions", body, key=None).status_code == 401
    assert _post(url, "/v1/completions", body, key="nope").status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
VALID = {
    "/v1/completions": {"model": "tiny-lm", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {
        "model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
    },
    "/v1/tasks/generation": {"input": {"prompt": "hi"}, "parameters": {"max_new_tokens": 2}},
}  # fmt: skip


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, object]:
    """A route and a body: anything at all, or a valid body with one field replaced by an
    arbitrary JSON value, removed, or joined by an unknown one."""
    path = draw(st.sampled_from(sorted(VALID)))
    body = dict(VALID[path])
    how = draw(st.sampled_from(["replace", "remove", "extra", "anything"]))
    if how == "anything":
        return path, draw(JSON)
    key = draw(st.sampled_from(sorted(body)))
    if how == "replace":
        body[key] = draw(JSON)
    elif how == "remove":
        del body[key]
    else:
        body[draw(st.text(min_size=1, max_size=10))] = draw(JSON)
    return path, body


def test_property_no_request_body_gets_a_5xx(generator_app):
    url, _ = generator_app
    headers = {"Authorization": f"Bearer {API_KEY}"}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:

        @settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(near_valid())
        def check(case: tuple[str, object]) -> None:
            path, body = case
            response = http.post(path, json=body)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (path, body, response.text)
            if response.status_code >= 400:
                assert "\n" not in response.json()["error"]["message"]

        check()
        ok = http.post("/v1/completions", json=VALID["/v1/completions"])
    assert ok.status_code == 200  # the replica survived all of it
    assert any(code >= 400 for code in seen) and 200 in seen, seen
