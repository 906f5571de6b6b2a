"""The Serve application through real HTTP on loopback: client, batching, 4xx, auth."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx
import pytest
import yaml

from serve.client import Client, TaskrayError
from tests.conftest import deployed_app, free_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
MAX_TEXT = 500


@pytest.fixture(scope="module")
def served(ray_session, tiny_bundle, tmp_path_factory):
    """configs/serve.yaml with the tiny bundle, an API key file and a free port."""
    tmp = tmp_path_factory.mktemp("serve")
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args["models"][0]["bundle"] = str(tiny_bundle)
    args["models"][0]["batch_wait_timeout_s"] = 0.05
    args["api_key_file"] = str(key_file)
    args["limits"]["max_text_chars"] = MAX_TEXT
    args["limits"]["max_body_bytes"] = 20_000
    with deployed_app(cfg, tmp, port=free_port(), timeout_s=180) as url:
        yield url


@pytest.fixture()
def client(served):
    with Client(served, api_key=API_KEY, timeout=30) as c:
        yield c


def post(url: str, body: bytes | dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(f"{url}/v1/tasks/classification", json=body, headers=headers)
    headers["Content-Type"] = "application/json"
    return httpx.post(f"{url}/v1/tasks/classification", content=body, headers=headers)


def test_classify_matches_in_process_model(client, tiny_bundle):
    from actors.bundle import load_bundle
    from actors.inference import predict_classification

    texts = ["the hotel was great", "useless phone honestly", "a film"]
    expected = predict_classification(load_bundle(tiny_bundle), texts, all_scores=True)
    single = client.classify(texts[0])
    assert single.label == expected[0]["label"]
    assert single.score == pytest.approx(expected[0]["score"], abs=1e-5)
    batch = client.classify(texts, return_all_scores=True)
    assert [p.label for p in batch] == [e["label"] for e in expected]
    for p in batch:
        assert set(p.scores) == {"Negative", "Positive"}
        assert sum(p.scores.values()) == pytest.approx(1.0)
        assert p.score == pytest.approx(max(p.scores.values()))


def test_concurrent_requests_form_batches(client, served):
    from ray import serve

    handle = serve.get_deployment_handle("classification-sentiment", app_name="taskray")
    before = handle.stats.remote().result()["batch_sizes"]
    with cf.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda i: client.classify(f"review number {i}"), range(48)))
    assert len(results) == 48
    after = handle.stats.remote().result()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    assert sum(k * v for k, v in new.items()) == 48
    assert max(new) > 1, f"no batch larger than 1: {new}"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"text": "unterminated', 422, "malformed JSON"),
        ({}, 422, "exactly one of"),
        ({"text": 5}, 422, "text: Input should be a valid string"),
        ({"texts": []}, 422, "at least one"),
        ({"texts": ["ok", 3]}, 422, "texts.1"),
        ({"text": "   "}, 422, "text: must be a non-empty string"),
        ({"text": "x" * (MAX_TEXT + 1)}, 413, "max_text_chars"),
        ({"texts": ["y" * 300] * 80}, 413, "max_body_bytes"),
        ({"text": "ok", "colour": "red"}, 422, "colour"),
        ({"text": "ok", "model": "nope"}, 404, "model 'nope'"),
    ],
)
def test_bad_requests_get_4xx_and_server_keeps_serving(served, client, body, status, fragment):
    response = post(served, body)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert fragment in message
    assert "\n" not in message
    assert client.classify("still serving after a bad request").label in {"Negative", "Positive"}


def test_auth_health_ready_and_openapi(served):
    assert post(served, {"text": "hi"}, key=None).status_code == 401
    assert post(served, {"text": "hi"}, key="wrong").status_code == 401
    assert httpx.get(f"{served}/healthz").status_code == 200
    ready = httpx.get(f"{served}/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == {"sentiment": True}
    schema = httpx.get(f"{served}/openapi.json").json()
    assert "/v1/tasks/classification" in schema["paths"]
    with Client(served) as anonymous, pytest.raises(TaskrayError) as info:
        anonymous.models()
    assert info.value.status == 401
    with Client(served, api_key=API_KEY) as c:
        cards = c.models().data
    assert [(m.id, m.task, m.labels) for m in cards] == [
        ("sentiment", "classification", ["Negative", "Positive"])
    ]
    assert API_KEY not in httpx.get(f"{served}/openapi.json").text
