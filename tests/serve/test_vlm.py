"""A multimodal bundle served through Ray Serve: ``/v1/tasks/multimodal`` (base64 JSON and
multipart upload), OpenAI chat with image content parts, ``/v1/rag`` with an image (retriever →
VLM), image refusals; greedy answers equal the in-process model's."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.actors.test_retrieval import corpus_documents
from tests.conftest import free_port

pytestmark = pytest.mark.ray

KEY = "vlm-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


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
def url(ray_session, tmp_path_factory, tiny_vlm_bundle):
    from ray import serve

    from actors.embedder import Embedder
    from actors.indexing import index_documents
    from actors.vectorstore import QdrantOptions, VectorStore
    from cluster import serving

    tmp = tmp_path_factory.mktemp("vlm-serve")
    (tmp / "key").write_text(KEY)
    qdrant = {"path": str(tmp / "qdrant"), "collection": "docs"}
    with VectorStore.open(QdrantOptions(**qdrant)) as store:
        index_documents(corpus_documents()[:40], Embedder("all-MiniLM-L6-v2", "cpu"), store)
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [
            {
                "name": "taskray",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {
                    "api_key_env": None,
                    "api_key_file": str(tmp / "key"),
                    "limits": {"max_image_bytes": 40_000, "max_image_pixels": 512 * 512},
                    "models": [
                        {
                            "name": "vlm",
                            "bundle": str(tiny_vlm_bundle),
                            "num_cpus": 0.25,
                            "generation": {"max_new_tokens": 6},
                        }
                    ],
                    "retrieval": {
                        "qdrant": qdrant,
                        "default_k": 2,
                        "num_cpus": 0.25,
                        "rag": {"vlm": "vlm", "passage_budget": 300, "num_cpus": 0.1},
                    },
                },
            }
        ],
    }
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = serving.load_serve_config(str(path))
    base = serving.base_url(loaded)
    serving.deploy(loaded)
    serving.wait_ready(base, timeout_s=240, progress=lambda *_: None)
    yield base
    serve.shutdown()


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
    with Client(url, api_key=KEY) as client:
        for image, prompt, want in zip(IMAGES, PROMPTS, expected, strict=True):
            assert client.vlm(image, prompt)["text"] == want
            assert client.vlm(image, prompt, upload=True)["text"] == want
        plain = base64.b64encode(IMAGES[0]).decode()  # plain base64 works like a data URI
        r = httpx.post(
            f"{url}/v1/tasks/multimodal",
            json={"image": plain, "prompt": PROMPTS[0]},
            headers=AUTH,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == [{"text": expected[0]}]
        assert r.json()["task"] == "multimodal"
        cards = {c.id: c for c in client.models().data}
        assert cards["vlm"].task == "multimodal"


def test_openai_chat_with_an_image_content_part(url, local):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
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
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "vlm", "prompt": "x"}, headers=AUTH, timeout=30
    )
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
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_uploads_are_refused_and_the_replica_keeps_serving(url):
    post = f"{url}/v1/tasks/multimodal"
    text_file = {"image": ("notes.png", b"hello there\n" * 10, "image/png")}
    r = httpx.post(post, files=text_file, data={"prompt": "?"}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and "not an image" in r.json()["error"]["message"]
    r = httpx.post(post, data={"prompt": "no file"}, files={"x": ("a", b"1")}, headers=AUTH)
    assert r.status_code == 422 and "image" in r.json()["error"]["message"]
    r = httpx.post(post, json={"image": data_uri(png())}, headers=AUTH, timeout=30)
    assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]
    r = httpx.post(post, json={"image": data_uri(png()), "prompt": "x"}, timeout=30)
    assert r.status_code == 401
    ok = httpx.post(post, json={"image": data_uri(png()), "prompt": "x"}, headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_rag_with_an_image_composes_retriever_and_vlm(url):
    from serve.client import Client

    with Client(url, api_key=KEY) as client:
        out = client.rag("Which colour is the logo of the company?", image=IMAGES[0], k=2)
    assert out["mode"] == "vision"
    assert isinstance(out["answer"], str)
    assert out["passages"], "no passage reached the VLM's prompt"
    assert {c["id"] for c in out["citations"]} <= {p["id"] for p in out["passages"]}
    assert {"retrieve", "prompt", "generate", "total"} <= set(out["timings_ms"])
    r = httpx.post(
        f"{url}/v1/rag",
        json={"question": "q", "image": data_uri(png()[:50])},
        headers=AUTH,
        timeout=30,
    )
    assert r.status_code == 422, r.text
    assert json.loads(r.text)["error"]["message"].startswith("image")
