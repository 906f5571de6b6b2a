"""Retrieval and RAG through the ingress over HTTP: ``/v1/retrieve``, OpenAI-compatible
``/v1/embeddings`` (with the `openai` package), ``/v1/rag`` (plain and streamed), configured
from the same ``retrieval`` args a Serve config file carries."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from tests.actors.test_retrieval import corpus_documents
from tests.conftest import free_port, read_jsonl

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory):
    from ray import serve
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.embedder import Embedder
    from actors.indexing import index_documents
    from actors.tiny import tiny_model_path
    from actors.vectorstore import QdrantOptions, VectorStore
    from cluster import serving

    tmp = tmp_path_factory.mktemp("retrieval-routes")
    qdrant = {"path": str(tmp / "qdrant"), "collection": "docs"}
    with VectorStore.open(QdrantOptions(**qdrant)) as store:
        index_documents(corpus_documents(), Embedder("all-MiniLM-L6-v2", "cpu"), store)
    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(tmp / "lm")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp / "lm")
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
                    "models": [
                        {
                            "name": "lm",
                            "bundle": str(tmp / "lm"),
                            "num_cpus": 0.25,
                            "generation": {"max_new_tokens": 8},
                        }
                    ],
                    "retrieval": {
                        "qdrant": qdrant,
                        "default_k": 3,
                        "num_cpus": 0.25,
                        "rag": {"generator": "lm", "passage_budget": 1500, "num_cpus": 0.1},
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
    # Shut Serve down (not just the app): the next module starts it on its own port.
    serve.shutdown()


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
