"""The web playground (``serve/playground.html``) served by the ingress at ``/`` and
``/playground``.

Without a browser: the page is self-contained (no external host, no embedded key), it is open
without the API key while every API route still needs it, and it is not in the API's schema.

In a real browser (Debian's headless ``chromium`` driven by Selenium through
``chromedriver``) against a live Serve application on loopback with an API key: a wrong key is
refused and the right one lists the models; a chat reply streams in; a classification shows
its label with score bars; NER highlights entities; extractive QA marks its answer in the
context; RAG lists its sources; a VLM answers about an uploaded image. A screenshot of each
is written under the test's temp dir. The browser tests skip, saying why, only when no
Chromium or chromedriver is installed (``.ci/run`` installs Debian's when absent).
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import app_config, deployed_app, read_jsonl, tiny_lm_dir

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "playground-" + "k3y-for-tests"
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
NER_TEXT = "Tim Cook runs Apple from Cupertino."
#: The tags the NER head is fitted to give NER_TEXT's words (see ``_ner_bundle``).
NER_TAGS = ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC", "O"]
WAIT_S = 90.0


# ----- the page, without Ray or a browser ---------------------------------------------------
def test_page_is_self_contained_and_holds_no_key():
    from serve import playground

    html = playground.page()
    assert html.lstrip().lower().startswith("<!doctype html>")
    # No external host anywhere: no CDN script, stylesheet, font or image (air-gapped use).
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html)
    assert not re.search(r"(?i)<(?:script|link|img|iframe)[^>]*\s(?:src|href)=[\"'](?!data:)", html)
    styles = "".join(re.findall(r"(?s)<style>(.*?)</style>", html))
    assert styles and "@import" not in styles and "url(" not in styles
    # The key is typed in (a password field) and kept per tab, never embedded or persisted.
    assert 'type="password"' in html and "sessionStorage" in html
    assert "localStorage" not in html
    assert "Authorization" in html and "Bearer " in html
    # Its CSP allows only its own origin and its own inline script (by hash).
    csp = playground.headers()["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]{44}'; ", csp)
    assert "unsafe-inline" not in csp.split("script-src", 1)[1].split(";", 1)[0]


# ----- one Serve application ----------------------------------------------------------------
def _head_bundle(
    directory: Path, tiny_bert: Path, task_name: str, labels: list[str] | None
) -> tuple[Any, Any, Any]:
    """A random-init encoder bundle for ``task_name``: (task, model, tokenizer), saved."""
    from transformers import AutoTokenizer

    from actors.bundle import write_manifest
    from actors.config import ModelOptions
    from actors.modeling import build_model
    from tasks import get_task

    task = get_task(task_name, max_length=128, labels=labels)
    torch.manual_seed(0)
    model = build_model(
        ModelOptions(name_or_path=str(tiny_bert), init="random"), task.model_kind, task.labels
    ).model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    write_manifest(directory, task, str(tiny_bert))
    return task, model, tok


def _ner_bundle(directory: Path, tiny_bert: Path) -> Path:
    """A NER bundle whose (random) encoder is kept and whose linear tag head is solved by least
    squares to tag NER_TEXT as NER_TAGS, so the page has known entities to highlight."""
    task, model, tok = _head_bundle(directory, tiny_bert, "ner", NER_LABELS)
    row = task.validate({"text": NER_TEXT})
    assert row["tokens"] == ["Tim", "Cook", "runs", "Apple", "from", "Cupertino", "."]
    feature = task.encode_row(row, tok)
    ids = torch.tensor([feature["input_ids"]])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]
        # Wanted logits: +8 for the word's tag at every position of a word, "O" elsewhere.
        target = torch.full((len(ids[0]), len(NER_LABELS)), -8.0)
        for pos, word in enumerate(feature["word_ids"]):
            tag = NER_TAGS[word] if word >= 0 else "O"
            target[pos, NER_LABELS.index(tag)] = 8.0
        design = torch.cat([hidden, torch.ones(len(hidden), 1)], dim=1)
        solution = torch.linalg.lstsq(design, target).solution  # [hidden + 1, labels]
        model.classifier.weight.copy_(solution[:-1].T)
        model.classifier.bias.copy_(solution[-1])
        logits = model(input_ids=ids).logits[0]
    first = {w: p for p, w in reversed(list(enumerate(feature["word_ids"]))) if w >= 0}
    got = [NER_LABELS[int(logits[first[w]].argmax())] for w in sorted(first)]
    assert got == NER_TAGS, got
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def url(ray_session, tmp_path_factory, tiny_bert, tiny_bundle, tiny_vlm_bundle) -> Iterator[str]:
    """One application with what the page shows: a classifier, NER, extractive QA, a chat LM,
    a VLM and retrieval + RAG over the fixture corpus, behind an API key."""
    from actors.embedder import Embedder
    from actors.indexing import index_documents
    from actors.vectorstore import QdrantOptions, VectorStore
    from tests.actors.test_retrieval import corpus_documents

    tmp = tmp_path_factory.mktemp("playground")
    qdrant = {"path": str(tmp / "qdrant"), "collection": "docs"}
    with VectorStore.open(QdrantOptions(**qdrant)) as store:
        index_documents(corpus_documents(), Embedder("all-MiniLM-L6-v2", "cpu"), store)
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY)
    _head_bundle(tmp / "qa", tiny_bert, "extractive_qa", None)
    small = {"num_cpus": 0.15, "batch_wait_timeout_s": 0.0}
    models = [
        {"name": "sentiment", "bundle": str(tiny_bundle), **small},
        {"name": "ner", "bundle": str(_ner_bundle(tmp / "ner", tiny_bert)), **small},
        {"name": "qa", "bundle": str(tmp / "qa"), **small},
        # Every decoded piece is its own event, so the page has a stream to draw.
        {"name": "lm", "bundle": str(tiny_lm_dir(tmp / "lm")), **small,
         "generation": {"max_new_tokens": 24}, "scheduler": {"stream_interval_s": 0.0}},
        {"name": "vlm", "bundle": str(tiny_vlm_bundle), **small,
         "generation": {"max_new_tokens": 6}},
    ]  # fmt: skip
    args = {
        "api_key_file": str(key_file),
        "models": models,
        "retrieval": {
            "qdrant": qdrant,
            "default_k": 3,
            "num_cpus": 0.15,
            "rag": {"generator": "lm", "passage_budget": 1200, "num_cpus": 0.1},
        },
    }
    ingress = [{"name": "Ingress", "ray_actor_options": {"num_cpus": 0.1}}]
    with deployed_app(app_config(args, deployments=ingress), tmp, timeout_s=300) as base:
        yield base


@pytest.mark.ray
def test_page_is_public_and_the_api_still_needs_the_key(url):
    for path in ("/", "/playground"):
        page = httpx.get(url + path, timeout=30)
        assert page.status_code == 200, (path, page.text[:200])
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<title>taskray playground</title>" in page.text
        assert API_KEY not in page.text
        assert not re.search(r"(?i)https?://", page.text)
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.get(url + "/v1/models", headers=wrong, timeout=30).status_code == 401
    refused = httpx.post(url + "/v1/tasks/classification", json={"text": "x"}, timeout=30)
    assert refused.status_code == 401
    auth = {"Authorization": f"Bearer {API_KEY}"}
    listed = httpx.get(url + "/v1/models", headers=auth, timeout=30)
    assert listed.status_code == 200
    assert {m["id"] for m in listed.json()["data"]} == {"sentiment", "ner", "qa", "lm", "vlm"}
    # The page is not an API operation: not in the schema that clients and fuzzers read.
    schema = httpx.get(url + "/openapi.json", timeout=30).json()
    assert "/" not in schema["paths"] and "/playground" not in schema["paths"]


# ----- the page in a real browser -----------------------------------------------------------
def _chromium() -> tuple[str, str]:
    """(browser, chromedriver) paths, or a skip that says what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
    )
    if browser is None or driver is None:
        missing = " and ".join(
            name for name, p in (("chromium", browser), ("chromedriver", driver)) if p is None
        )
        pytest.skip(
            f"no {missing} on this machine: install Debian's with "
            "`apt-get install -y chromium chromium-driver` (.ci/run does so when it can)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser(url) -> Iterator[Any]:
    """A headless Chromium on the playground page, with the right key entered."""
    browser_path, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` (and the page's
    errors) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            errors = [e.text for e in driver.find_elements("css selector", ".error") if e.text]
            status = driver.find_element("id", "status").text
            pytest.fail(f"timed out waiting for {what} (status: {status!r}; errors: {errors})")
        time.sleep(0.05)


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def tab(driver: Any, name: str) -> None:
    driver.find_element("css selector", f"#tabs button[data-tab='{name}']").click()
    wait(driver, lambda: by_id(driver, f"panel-{name}").is_displayed(), f"the {name} tab")


def run_panel(driver: Any, panel: str, button: str) -> None:
    """Click a panel's button and wait until its request is done; fail on a shown error."""
    section = by_id(driver, f"panel-{panel}")
    driver.execute_script("arguments[0].dataset.state = ''", section)
    by_id(driver, button).click()
    state = wait(
        driver,
        lambda: (
            section.get_attribute("data-state") in ("done", "error")
            and section.get_attribute("data-state")
        ),
        f"the {panel} request",
    )
    assert state == "done", by_id(driver, f"{panel}-error").text


def shot(driver: Any, path: Path) -> None:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000, path


def fill(element: Any, text: str) -> None:
    element.clear()
    element.send_keys(text)


@pytest.fixture(scope="module")
def page(browser, url) -> Any:
    """The playground loaded and connected with the key (after a wrong key was refused)."""
    browser.get(url + "/playground")
    # Without a key, the page loads but cannot list models.
    wait(browser, lambda: "API key" in by_id(browser, "status").text, "the key to be asked for")
    fill(by_id(browser, "api-key"), "wrong-key")
    by_id(browser, "connect").click()
    wait(browser, lambda: "missing or wrong" in by_id(browser, "status").text, "a refused key")
    fill(by_id(browser, "api-key"), API_KEY)
    by_id(browser, "connect").click()
    wait(browser, lambda: "connected" in by_id(browser, "status").text, "the models to list")
    return browser


@pytest.mark.ray
def test_page_loads_lists_models_and_keeps_the_key_in_the_tab(page, tmp_path):
    rows = page.find_elements("css selector", "#models tbody tr")
    assert {r.get_attribute("data-model") for r in rows} == {"sentiment", "ner", "qa", "lm", "vlm"}
    assert by_id(page, "status").text == "connected: 5 models"
    options = page.find_elements("css selector", "#chat-model option")
    assert [o.get_attribute("value") for o in options] == ["lm"]
    # The key lives in this tab's sessionStorage and the password field, nowhere else.
    assert page.execute_script("return window.localStorage.length") == 0
    stored = page.execute_script("return sessionStorage.getItem('taskray.playground.key')")
    assert stored == API_KEY
    assert API_KEY not in page.current_url and API_KEY not in page.page_source
    shot(page, tmp_path / "loaded.png")


@pytest.mark.ray
def test_chat_reply_streams_in(page, tmp_path):
    tab(page, "chat")
    # Record the reply's text each time the page changes it (a MutationObserver: one entry per
    # render, so a reply drawn piece by piece leaves several growing lengths).
    page.execute_script(
        """
        window.__lengths = [];
        new MutationObserver(() => {
          const r = document.querySelector('#chat-log .msg.assistant:last-child');
          if (r) window.__lengths.push(r.textContent.length);
        }).observe(document.getElementById('chat-log'),
                   {childList: true, subtree: true, characterData: true});
        """
    )
    fill(by_id(page, "chat-max"), "24")
    fill(by_id(page, "chat-input"), "Hello there, who are you?")
    by_id(page, "chat-send").click()
    reply = wait(
        page,
        lambda: page.find_elements("css selector", "#chat-log .msg.assistant[data-done='true']"),
        "the chat reply",
    )[-1]
    assert by_id(page, "panel-chat").get_attribute("data-state") == "done", by_id(
        page, "chat-error"
    ).text
    assert reply.text.strip(), "an empty reply"
    assert int(reply.get_attribute("data-chunks")) >= 2
    lengths = page.execute_script("return window.__lengths")
    grown = sorted({n for n in lengths if n > 0})
    assert len(grown) >= 2, f"the reply did not grow piece by piece: {lengths}"
    assert reply.get_attribute("data-finish") in ("stop", "length")
    user = page.find_elements("css selector", "#chat-log .msg.user")
    assert user[-1].text == "Hello there, who are you?"
    shot(page, tmp_path / "chat.png")


@pytest.mark.ray
def test_classification_shows_its_label_with_score_bars(page, tmp_path):
    tab(page, "classify")
    fill(by_id(page, "classify-text"), "the hotel was really wonderful")
    run_panel(page, "classify", "classify-run")
    label = by_id(page, "classify-label").text
    assert label in {"Negative", "Positive"}
    bars = page.find_elements("css selector", "#classify-bars .bar")
    assert {b.get_attribute("data-label") for b in bars} == {"Negative", "Positive"}
    scores = {b.get_attribute("data-label"): float(b.get_attribute("data-score")) for b in bars}
    assert abs(sum(scores.values()) - 1) < 1e-3 and max(scores, key=scores.get) == label
    top = next(b for b in bars if b.get_attribute("data-label") == label)
    assert "top" in top.get_attribute("class")
    track = top.find_element("xpath", "..")
    assert top.size["width"] == pytest.approx(track.size["width"] * scores[label], abs=3)
    shot(page, tmp_path / "classify.png")


@pytest.mark.ray
def test_ner_highlights_entities_in_the_text(page, tmp_path):
    tab(page, "ner")
    fill(by_id(page, "ner-text"), NER_TEXT)
    run_panel(page, "ner", "ner-run")
    marks = page.find_elements("css selector", "#ner-out mark")
    # Each mark holds the entity's text, then a small tag naming its type.
    found = {
        m.get_attribute("data-label"): page.execute_script(
            "return arguments[0].firstChild.textContent", m
        )
        for m in marks
    }
    assert found == {"Person": "Tim Cook", "Organization": "Apple", "Location": "Cupertino"}
    # The rest of the text is there, unmarked and in order.
    untagged = page.execute_script(
        "const copy = arguments[0].cloneNode(true);"
        "copy.querySelectorAll('.tag').forEach((t) => t.remove());"
        "return copy.textContent;",
        by_id(page, "ner-out"),
    )
    assert untagged == NER_TEXT
    shot(page, tmp_path / "ner.png")


@pytest.mark.ray
def test_extractive_qa_marks_its_answer_in_the_context(page, tmp_path):
    tab(page, "qa")
    context = "Tim Cook runs Apple from Cupertino."
    fill(by_id(page, "qa-question"), "Who runs Apple?")
    fill(by_id(page, "qa-context"), context)
    run_panel(page, "qa", "qa-run")
    answer = by_id(page, "qa-answer").text
    marks = page.find_elements("css selector", "#qa-out mark")
    assert by_id(page, "qa-out").get_attribute("textContent") == context
    if answer.startswith("(no answer"):  # a random head may find none; then nothing is marked
        assert marks == []
    else:
        assert [m.text for m in marks] == [answer] and answer in context
    shot(page, tmp_path / "qa.png")


@pytest.mark.ray
def test_rag_answer_lists_its_sources(page, tmp_path):
    question = read_jsonl(ROOT / "data" / "fixtures" / "retrieval_questions.jsonl")[1]
    tab(page, "rag")
    fill(by_id(page, "rag-question"), question["question"])
    run_panel(page, "rag", "rag-run")
    assert by_id(page, "rag-answer").is_displayed()
    sources = page.find_elements("css selector", "#rag-sources li")
    assert 1 <= len(sources) <= 3
    ids = [s.get_attribute("data-id") for s in sources]
    assert any(i.split("#")[0] in question["relevant_ids"] for i in ids), ids
    assert all(s.find_element("css selector", ".src-text").text for s in sources)
    assert by_id(page, "rag-sources-title").is_displayed()
    shot(page, tmp_path / "rag.png")


@pytest.mark.ray
def test_vision_answers_about_an_uploaded_image(page, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (220, 30, 30)).save(buffer, format="PNG")
    image.write_bytes(buffer.getvalue())
    tab(page, "vision")
    by_id(page, "vision-file").send_keys(str(image))
    wait(page, lambda: by_id(page, "vision-preview").is_displayed(), "the image preview")
    fill(by_id(page, "vision-prompt"), "What colour is it?")
    run_panel(page, "vision", "vision-run")
    assert by_id(page, "vision-out").is_displayed()
    shot(page, tmp_path / "vision.png")
