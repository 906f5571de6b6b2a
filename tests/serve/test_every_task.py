"""Every text task route through the Python clients (sync and async): encoder heads for
classification, NLI, NER and extractive QA, and one generator that also serves the other
generative families; each answers in its family's documented shape."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from serve.client import AsyncClient, Client, TaskrayError
from tests.conftest import app_config, deployed_app, tiny_lm_dir

pytestmark = pytest.mark.ray

NLI_LABELS = ["contradiction", "entailment", "neutral"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
GENERATIVE = ["dialogue", "generative_qa", "summarization", "translation", "code", "reasoning"]


def _head_bundle(tmp: Path, tiny_bert: Path, task_name: str, labels: list[str] | None) -> str:
    """A random-init encoder bundle for ``task_name`` (serving needs shapes, not skill)."""
    from actors.bundle import write_manifest
    from actors.config import ModelOptions
    from actors.modeling import build_model
    from tasks import get_task

    task = get_task(task_name, max_length=64, labels=labels)
    torch.manual_seed(0)
    built = build_model(
        ModelOptions(name_or_path=str(tiny_bert), init="random"), task.model_kind, task.labels
    )
    path = tmp / task_name
    built.model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    write_manifest(path, task, str(tiny_bert))
    return str(path)


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory, tiny_bert, tiny_bundle):
    tmp = tmp_path_factory.mktemp("every-task")
    small = {"num_cpus": 0.2, "batch_wait_timeout_s": 0.02}
    models = [
        {"name": "sentiment", "bundle": str(tiny_bundle), **small},
        {"name": "nli", "bundle": _head_bundle(tmp, tiny_bert, "nli", NLI_LABELS), **small},
        {"name": "ner", "bundle": _head_bundle(tmp, tiny_bert, "ner", NER_LABELS), **small},
        {"name": "qa", "bundle": _head_bundle(tmp, tiny_bert, "extractive_qa", None), **small},
        {"name": "lm", "bundle": str(tiny_lm_dir(tmp / "lm")), "also_serves": GENERATIVE,
         "generation": {"max_new_tokens": 6}, **small},
    ]  # fmt: skip
    config = app_config(
        {"api_key_env": None, "models": models},
        deployments=[{"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}}],
    )
    with deployed_app(config, tmp) as base:
        yield base


def test_encoder_heads_answer_in_their_shapes(url):
    context = "Tim Cook runs Apple from Cupertino."
    with Client(url) as client:
        label = client.classify("great value")
        assert label.label in {"Negative", "Positive"} and 0 <= label.score <= 1
        nli = client.nli("A man plays a guitar.", "Someone makes music.")
        assert nli["label"] in {"contradiction", "entailment", "neutral"}
        assert 0 <= nli["score"] <= 1
        entities = client.ner(context)
        assert {"tags", "entities", "Person", "Organization"} <= set(entities)
        for span in entities["entities"]:
            assert context[span["start"] : span["end"]] == span["text"]
            assert span["text"] in entities[span["label"]]
        answer = client.extractive_qa("Who runs Apple?", context)
        assert {"answer", "start", "end", "score"} <= set(answer)
        if answer["answer"]:
            assert context[answer["start"] : answer["end"]] == answer["answer"]
        several = client.task(
            "nli", inputs=[{"premise": "a", "hypothesis": "b"}, {"premise": "c", "hypothesis": "d"}]
        )
        assert len(several) == 2


def test_generator_serves_every_generative_family(url):
    with Client(url) as client:
        assert isinstance(client.generate("Once upon a time")["text"], str)
        assert isinstance(client.summarize("A long report about trains.")["text"], str)
        assert isinstance(client.translate("Guten Morgen", "de", "en")["text"], str)
        assert isinstance(client.generative_qa("Who?", "Ada wrote it.")["text"], str)
        assert "code" in client.code("add two numbers")
        reasoning = client.reason("What is 2 + 3?")
        assert "answer" in reasoning
        reply = client.dialogue([{"role": "user", "content": "Hello!"}])
        assert isinstance(reply, dict) and reply
        cards = {m.id: m for m in client.models().data}
        assert set(GENERATIVE) <= set(cards["lm"].also or [])
        with pytest.raises(TaskrayError) as info:
            client.task("generation", input={"prompt": "x"}, model="nli")
        assert info.value.status == 404


def test_async_client_and_streaming(url):
    async def main() -> tuple[str, str, list[str]]:
        async with AsyncClient(url) as client:
            done = await client.complete("Hello", model="lm", max_tokens=5)
            pieces = [p async for p in client.stream_complete("Hello", model="lm", max_tokens=5)]
            label = await client.classify("fine")
            return done.text, label.label, pieces

    text, label, pieces = asyncio.run(main())
    assert "".join(pieces) == text
    assert label in {"Negative", "Positive"}
    with Client(url) as client:
        assert "".join(client.complete("Hello", model="lm", max_tokens=5, stream=True)) == text
