"""Retrieval, RAG and a vision-language model through the ingress over HTTP, in one Serve app
(configured from the same ``args`` a Serve config file carries): ``/v1/retrieve``,
OpenAI-compatible ``/v1/embeddings`` (with the `openai` package), ``/v1/rag`` (plain, streamed,
and with an image: retriever → VLM), ``/v1/tasks/multimodal`` (base64 JSON and multipart
upload), OpenAI chat with image content parts, image refusals; the VLM's greedy answers equal
the in-process model's."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.actors.test_retrieval import corpus_documents
from tests.conftest import app_config, deployed_app, read_jsonl, tiny_lm_dir

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory, tiny_vlm_bundle):
    from actors.embedder import Embedder
    from actors.indexing import index_documents
    from actors.vectorstore import QdrantOptions, VectorStore

    tmp = tmp_path_factory.mktemp("retrieval-routes")
    qdrant = {"path": str(tmp / "qdrant"), "collection": "docs"}
    with VectorStore.open(QdrantOptions(**qdrant)) as store:
        index_documents(corpus_documents(), Embedder("all-MiniLM-L6-v2", "cpu"), store)
    args = {
        "api_key_env": None,
        "limits": {"max_image_bytes": 40_000, "max_image_pixels": 512 * 512},
        "models": [
            {
                "name": "lm",
                "bundle": str(tiny_lm_dir(tmp / "lm")),
                "num_cpus": 0.25,
                "generation": {"max_new_tokens": 8},
            },
            {
                "name": "vlm",
                "bundle": str(tiny_vlm_bundle),
                "num_cpus": 0.25,
                "generation": {"max_new_tokens": 6},
            },
        ],
        "retrieval": {
            "qdrant": qdrant,
            "default_k": 3,
            "num_cpus": 0.25,
            "rag": {"generator": "lm", "vlm": "vlm", "passage_budget": 1500, "num_cpus": 0.1},
        },
    }
    with deployed_app(app_config(args), tmp) as base:
        yield base


def test_retrieve_finds_the_relevant_document(url):
    questions = read_jsonl(ROOT / "data" / "fixtures" / "retrieval_questions.jsonl")[:6]
    hits = 0
    for q in questions:
        r = httpx.post(f"{url}/v1/retrieve", json={"query": q["question"], "k": 3}, timeout=30)
        assert r.status_code == 200, r.text
        passages = r.json()["passages"]
        assert len(passages) == 3
        assert passages[0]["score"] >= passages[-1]["score"]
        hits += any(p["doc_id"] in q["relevant_ids"] for p in passages)
    assert hits >= 5
    bad = httpx.post(f"{url}/v1/retrieve", json={"query": "x", "k": 0}, timeout=30)
    assert bad.status_code == 422 and "k" in bad.json()["error"]["message"]


def test_openai_embeddings_are_normalised_and_ordered(url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["The cat sat on the mat.", "Quarterly revenue rose 4%.", "The cat sat on the mat."]
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    vectors = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-5)


def test_rag_answers_with_cited_sources_and_timings(url):
    question = read_jsonl(ROOT / "data" / "fixtures" / "retrieval_questions.jsonl")[0]
    r = httpx.post(f"{url}/v1/rag", json={"question": question["question"]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["answer"], str)
    ids = {p["id"] for p in body["passages"]}
    assert body["passages"], "no passage fitted the prompt budget"
    assert {c["id"] for c in body["citations"]} <= ids
    assert any(p["doc_id"] in question["relevant_ids"] for p in body["passages"])
    assert {"retrieve", "prompt", "generate", "total"} <= set(body["timings_ms"])

    with httpx.stream(
        "POST", f"{url}/v1/rag", json={"question": question["question"], "stream": True},
        timeout=60,
    ) as response:  # fmt: skip
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    items = [json.loads(e) for e in events[:-1]]
    assert "passages" in items[0] and "done" in items[-1]

    missing = httpx.post(f"{url}/v1/rag", json={"question": "x", "mode": "extractive"})
    assert missing.status_code == 422, missing.text
    empty = httpx.post(f"{url}/v1/rag", json={"question": ""})
    assert empty.status_code == 422


def test_python_client_retrieval_methods(url):
    from serve.client import Client

    with Client(url) as client:
        passages = client.retrieve("How do I reset my password?", k=2)
        assert len(passages) == 2 and passages[0]["text"]
        vectors = client.embed(["one", "two"])
        assert len(vectors) == 2 and len(vectors[0]) == 384
        answer = client.rag("How do I reset my password?", k=2, max_new_tokens=4)
        assert {"answer", "citations", "passages", "timings_ms"} <= set(answer)


# ----- the vision-language model ---------------------------------------------------------
def png(colour=(220, 30, 30), size=(64, 64), fmt="PNG", noise=False) -> bytes:
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def local(tiny_vlm_bundle):
    from actors.vlm import load_vlm

    return load_vlm(tiny_vlm_bundle)


def in_process(local, data: bytes, prompt: str) -> str:
    from actors.vlm import answer
    from tasks.multimodal import load_image

    return answer(local, [load_image(data)], [prompt], max_new_tokens=6)[0]["text"]


IMAGES = [png((220, 30, 30)), png((30, 70, 220), size=(48, 80)), png(fmt="JPEG")]
PROMPTS = ["What colour is the square?", "How many circles are there?", "What shape is red?"]


def test_served_greedy_answers_equal_the_in_process_model(url, local):
    from serve.client import Client

    expected = [in_process(local, i, p) for i, p in zip(IMAGES, PROMPTS, strict=True)]
    assert len(set(expected)) > 1 or expected[0]  # the random model says something
    with Client(url) as client:
        for image, prompt, want in zip(IMAGES, PROMPTS, expected, strict=True):
            assert client.vlm(image, prompt)["text"] == want
            assert client.vlm(image, prompt, upload=True)["text"] == want
        plain = base64.b64encode(IMAGES[0]).decode()  # plain base64 works like a data URI
        r = httpx.post(
            f"{url}/v1/tasks/multimodal",
            json={"image": plain, "prompt": PROMPTS[0]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == [{"text": expected[0]}]
        assert r.json()["task"] == "multimodal"
        cards = {c.id: c for c in client.models().data}
        assert cards["vlm"].task == "multimodal"


def test_openai_chat_with_an_image_content_part(url, local):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    content = [
        {"type": "text", "text": PROMPTS[1]},
        {"type": "image_url", "image_url": {"url": data_uri(IMAGES[1])}},
    ]
    messages = [{"role": "user", "content": content}]
    reply = client.chat.completions.create(model="vlm", messages=messages)
    want = in_process(local, IMAGES[1], PROMPTS[1])
    assert reply.choices[0].message.content == want
    stream = client.chat.completions.create(model="vlm", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want

    no_image = client.with_options(max_retries=0)
    with pytest.raises(Exception) as err:
        no_image.chat.completions.create(model="vlm", messages=[{"role": "user", "content": "hi"}])
    assert getattr(err.value, "status_code", None) == 422
    # A text route refuses the multimodal model by name, pointing at the right route.
    r = httpx.post(f"{url}/v1/completions", json={"model": "vlm", "prompt": "x"}, timeout=30)
    assert r.status_code == 422 and "multimodal" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "image, status, words",
    [
        (data_uri(png()[:70]), 422, "corrupt or truncated"),
        (data_uri(b"just some text, not a picture\n" * 3), 422, "not an image"),
        (data_uri(png(noise=True, size=(200, 200))), 413, "over the limit"),
        (data_uri(png(size=(1024, 1024))), 413, "pixels"),
        (data_uri(png(fmt="TIFF")), 422, "TIFF is not supported"),
        ("https://example.com/cat.png", 422, "not fetched"),
        ("data:image/png;base64,@@@@", 422, "base64"),
        ("not base64 at all!", 422, "base64"),
    ],
)
def test_bad_images_get_4xx_naming_the_problem(url, image, status, words):
    r = httpx.post(
        f"{url}/v1/tasks/multimodal",
        json={"image": image, "prompt": "What colour?"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_uploads_are_refused_and_the_replica_keeps_serving(url):
    post = f"{url}/v1/tasks/multimodal"
    text_file = {"image": ("notes.png", b"hello there\n" * 10, "image/png")}
    r = httpx.post(post, files=text_file, data={"prompt": "?"}, timeout=30)
    assert r.status_code == 422 and "not an image" in r.json()["error"]["message"]
    r = httpx.post(post, data={"prompt": "no file"}, files={"x": ("a", b"1")})
    assert r.status_code == 422 and "image" in r.json()["error"]["message"]
    r = httpx.post(post, json={"image": data_uri(png())}, timeout=30)
    assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]
    ok = httpx.post(post, json={"image": data_uri(png()), "prompt": "x"}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_rag_with_an_image_composes_retriever_and_vlm(url):
    from serve.client import Client

    with Client(url) as client:
        out = client.rag("Which colour is the logo of the company?", image=IMAGES[0], k=2)
    assert out["mode"] == "vision"
    assert isinstance(out["answer"], str)
    assert out["passages"], "no passage reached the VLM's prompt"
    assert {c["id"] for c in out["citations"]} <= {p["id"] for p in out["passages"]}
    assert {"retrieve", "prompt", "generate", "total"} <= set(out["timings_ms"])
    r = httpx.post(
        f"{url}/v1/rag",
        json={"question": "q", "image": data_uri(png()[:50])},
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert json.loads(r.text)["error"]["message"].startswith("image")
