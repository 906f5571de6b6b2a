"""The extractive QA task: schema, doc-stride windows, span decoding, SQuAD metrics."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tasks.base import RowError, TaskError
from tasks.extractive_qa import ExtractiveQATask
from tests.conftest import read_jsonl
from tests.toy_tokenizers import bpe_tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "fixtures" / "extractive_qa.jsonl"
PEAK = 10.0


def qa(max_length: int = 96, **options) -> ExtractiveQATask:
    options.setdefault("doc_stride", 32)
    return ExtractiveQATask(max_length=max_length, **options)


@pytest.fixture(scope="module")
def fixture_rows() -> list[dict]:
    return read_jsonl(FIXTURE)


@pytest.fixture()
def tokenizer(word_tokenizer):
    return word_tokenizer


def perfect_windows(windows: list[dict], null_peaks: bool = False) -> list[dict]:
    """Peaks at each window's gold start/end; windows without the answer are flat (or peak at
    position 0 with ``null_peaks``, as a model trained on SQuAD 2.0 targets would)."""
    out = []
    for window in windows:
        n = len(window["input_ids"])
        start, end = np.zeros(n), np.zeros(n)
        s, e = window["start_positions"], window["end_positions"]
        if s != 0 or null_peaks:
            start[s] = PEAK
            end[e] = PEAK
        out.append(
            {"start_logits": start, "end_logits": end, "offset_mapping": window["offset_mapping"]}
        )
    return out


# ----- rows ------------------------------------------------------------------------------------
def test_every_fixture_row_validates(fixture_rows):
    task = qa()
    rows = [task.validate(raw) for raw in fixture_rows]
    unanswerable = [row for row in rows if not row["answers"]["text"]]
    multi = [row for row in rows if len(row["answers"]["text"]) > 1]
    assert unanswerable and multi
    assert all(row["id"] for row in rows)


CONTEXT = "Tim Cook has led Apple since 2011."
QUESTION = "Who leads Apple?"


def row_with(**changes) -> dict:
    row = {
        "context": CONTEXT,
        "question": QUESTION,
        "answers": {"text": ["Tim Cook"], "answer_start": [0]},
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        (
            row_with(answers={"text": ["Tim Cook"], "answer_start": [4]}),
            "answers",
            "answer 0: context[4:12] is 'Cook has', not 'Tim Cook'",
        ),
        (
            row_with(answers={"text": ["Tim Cook", "Cook"], "answer_start": [0, 3]}),
            "answers",
            "answer 1: context[3:7] is ' Coo', not 'Cook'",
        ),
        (
            row_with(answers={"text": ["Tim Cook", "Cook"], "answer_start": [0]}),
            "answers",
            "2 answer texts but 1 answer_start",
        ),
        (
            row_with(answers={"text": ["2011."], "answer_start": [31]}),
            "answers",
            "does not fit in the context",
        ),
        (row_with(answers={"text": [""], "answer_start": [0]}), "answers", "answer 0 is empty"),
        (row_with(answers={"text": ["Tim"]}), "answers.answer_start", "missing"),
        (row_with(answers={"text": "Tim", "answer_start": 0}), "answers.text", "list"),
        (row_with(context=""), "context", "non-empty"),
        (row_with(context="  \n"), "context", "non-empty"),
        (row_with(question=" "), "question", "non-empty"),
        ({"context": CONTEXT}, "question", "missing"),
        ({"question": QUESTION}, "context", "missing"),
        (row_with(question=["Who?"]), "question", "string"),
        ("not a row", "row", "JSON object"),
    ],
)
def test_malformed_rows_name_the_field(row, field, fragment):
    with pytest.raises(RowError) as info:
        qa().validate(row)
    assert info.value.field == field
    assert fragment in info.value.reason


def test_inference_and_unanswerable_rows_are_valid(minilm_tokenizer):
    task = qa()
    row = task.validate({"context": CONTEXT, "question": QUESTION, "id": 7})
    assert row == {"context": CONTEXT, "question": QUESTION, "id": "7"}
    [window] = task.encode_row(row, minilm_tokenizer)
    assert "start_positions" not in window
    empty = task.validate(row_with(answers={"text": [], "answer_start": []}))
    [window] = task.encode_row(empty, minilm_tokenizer)
    assert window["start_positions"] == window["end_positions"] == 0


def test_options_are_checked():
    task = ExtractiveQATask()
    assert task.options.model_dump() == {
        "doc_stride": 128,
        "max_answer_length": 30,
        "n_best": 20,
        "allow_no_answer": False,
    }
    assert task.spec()["options"]["doc_stride"] == 128
    with pytest.raises(TaskError, match="stride"):
        ExtractiveQATask(stride=3)
    with pytest.raises(TaskError, match="n_best"):
        ExtractiveQATask(n_best=0)


# ----- encoding ----------------------------------------------------------------------------------
def test_windows_cover_the_context_with_overlap(fixture_rows, minilm_tokenizer):
    task = qa()
    row = task.validate(fixture_rows[0])
    windows = task.encode_row(row, minilm_tokenizer)
    assert len(windows) > 3
    covered = []
    for window in windows:
        assert len(window["input_ids"]) <= 96
        assert window["input_ids"][0] == minilm_tokenizer.cls_token_id
        assert len(window["offset_mapping"]) == len(window["input_ids"])
        spans = [o for o in window["offset_mapping"] if o != [-1, -1]]
        covered.append((spans[0][0], spans[-1][1]))
        # Question and special tokens are marked out.
        assert window["offset_mapping"][0] == [-1, -1]
    assert covered[0][0] == 0 and covered[-1][1] >= len(row["context"].rstrip()) - 1
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert start < end  # consecutive windows overlap (doc_stride tokens)


def test_a_question_without_room_for_context_is_rejected(minilm_tokenizer):
    task = qa(max_length=16)
    row = task.validate(row_with(question="why " * 20))
    with pytest.raises(RowError) as info:
        task.encode_row(row, minilm_tokenizer)
    assert info.value.field == "question"
    assert "no room" in info.value.reason


def test_a_long_question_shrinks_the_stride_instead_of_failing(minilm_tokenizer):
    # 20 question tokens + 3 specials leave 9 context tokens per window, less than doc_stride.
    task = qa(max_length=32, doc_stride=16)
    context = " ".join(f"w{i}" for i in range(40))
    row = task.validate({"question": "why " * 20, "context": context})
    windows = task.encode_row(row, minilm_tokenizer)
    assert len(windows) > 2
    assert all(len(w["input_ids"]) <= 32 for w in windows)


# ----- decoding ----------------------------------------------------------------------------------
def test_perfect_logits_decode_every_first_gold_answer(fixture_rows, tokenizer, minilm_tokenizer):
    if tokenizer is minilm_tokenizer:
        task = qa()
    else:
        # The toy BPE vocabulary is tiny, so words take several tokens: longer answers.
        task = qa(max_length=192, doc_stride=64, max_answer_length=100)
    rows = [task.validate(raw) for raw in fixture_rows]
    answerable = [row for row in rows if row["answers"]["text"]]
    encoded = [task.encode_row(row, tokenizer) for row in answerable]
    predictions = task.decode([perfect_windows(w) for w in encoded], answerable)
    only_later = 0
    for row, windows, pred in zip(answerable, encoded, predictions, strict=True):
        text, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
        assert pred["answer"] == text, row["id"]
        assert (pred["start"], pred["end"]) == (start, start + len(text))
        assert row["context"][pred["start"] : pred["end"]] == pred["answer"]
        assert 0.5 < pred["score"] <= 1.0
        holding = [i for i, w in enumerate(windows) if w["start_positions"] != 0]
        assert holding, row["id"]
        only_later += holding[0] >= 1
    if tokenizer is minilm_tokenizer:
        assert only_later >= 10
    assert task.metrics(predictions, answerable) == {
        "exact_match": 1.0,
        "f1": 1.0,
        "count": float(len(answerable)),
    }


def test_no_answer_wins_when_allowed(fixture_rows, minilm_tokenizer):
    strict = qa()
    lenient = qa(allow_no_answer=True)
    rows = [lenient.validate(raw) for raw in fixture_rows]
    empty = [row for row in rows if not row["answers"]["text"]]
    answerable = [row for row in rows if row["answers"]["text"]]
    outputs = [perfect_windows(lenient.encode_row(r, minilm_tokenizer), True) for r in empty]
    for pred in lenient.decode(outputs, empty):
        assert pred["answer"] == "" and pred["start"] == pred["end"] == -1
        assert pred["score"] > 0.5
    assert all(pred["answer"] for pred in strict.decode(outputs, empty))
    assert lenient.metrics(lenient.decode(outputs, empty), empty)["exact_match"] == 1.0
    # Windows that lack the answer peak at position 0, but the null score is the lowest over
    # the windows, so the window that holds the answer decides.
    outputs = [perfect_windows(lenient.encode_row(r, minilm_tokenizer), True) for r in answerable]
    for row, pred in zip(answerable, lenient.decode(outputs, answerable), strict=True):
        assert pred["answer"] == row["answers"]["text"][0]


def window_for(context: str, tokenizer, task) -> tuple[dict, list[int]]:
    row = task.validate({"context": context, "question": "Which?"})
    [window] = task.encode_row(row, tokenizer)
    ctx = [i for i, o in enumerate(window["offset_mapping"]) if o != [-1, -1]]
    return window, ctx


def test_span_constraints(minilm_tokenizer):
    context = "one two three four five six seven eight nine ten"
    task = qa(max_length=64, max_answer_length=3)
    window, ctx = window_for(context, minilm_tokenizer, task)
    n = len(window["input_ids"])

    def decode(start_at: int, end_at: int) -> dict:
        start, end = np.zeros(n), np.zeros(n)
        start[ctx[start_at]], end[ctx[end_at]] = PEAK, PEAK
        out = {"start_logits": start, "end_logits": end, "offset_mapping": window["offset_mapping"]}
        return task.decode([[out]], [{"context": context}])[0]

    assert decode(1, 3)["answer"] == "two three four"
    # End before start: never returned as such; the best valid span keeps one of the peaks.
    pred = decode(7, 2)
    assert pred["start"] < pred["end"]
    assert pred["answer"] not in ("three four five six seven eight", "")
    assert pred["answer"].startswith("eight") or pred["answer"].endswith("three")
    # Longer than max_answer_length (3 tokens): cut down to at most 3 words.
    pred = decode(1, 8)
    assert len(pred["answer"].split()) <= 3
    assert pred["answer"].startswith("two") or pred["answer"].endswith("nine")


def test_decoding_is_the_best_valid_span_over_windows(minilm_tokenizer):
    """Random logits: the result equals a brute-force search over all windows."""
    rng = np.random.default_rng(0)
    context = " ".join(f"word{i}" for i in range(60))
    task = qa(max_length=32, doc_stride=8, max_answer_length=4, n_best=100)
    row = task.validate({"context": context, "question": "Which?"})
    windows = task.encode_row(row, minilm_tokenizer)
    assert len(windows) > 2
    for _ in range(20):
        outputs = []
        best, best_span = -np.inf, None
        for window in windows:
            n = len(window["input_ids"])
            start, end = rng.normal(size=n), rng.normal(size=n)
            offsets = window["offset_mapping"]
            outputs.append({"start_logits": start, "end_logits": end, "offset_mapping": offsets})
            ctx = [i for i, o in enumerate(offsets) if o != [-1, -1]]
            for s in ctx:
                for e in ctx:
                    if s <= e < s + 4 and start[s] + end[e] > best:
                        best, best_span = start[s] + end[e], (offsets[s][0], offsets[e][1])
        [pred] = task.decode([outputs], [row])
        assert (pred["start"], pred["end"]) == best_span
        assert pred["answer"] == context[best_span[0] : best_span[1]]


def test_score_is_the_softmax_over_candidates(minilm_tokenizer):
    context = "alpha beta"
    task = qa(max_length=32)
    window, ctx = window_for(context, minilm_tokenizer, task)
    n = len(window["input_ids"])
    start, end = np.full(n, -50.0), np.full(n, -50.0)
    # Candidates: alpha (1+1), alpha beta (1+0), beta (0+0); beta..alpha is invalid.
    start[ctx[0]], start[ctx[-1]] = 1.0, 0.0
    end[ctx[0]], end[ctx[-1]] = 1.0, 0.0
    out = {"start_logits": start, "end_logits": end, "offset_mapping": window["offset_mapping"]}
    [pred] = task.decode([[out]], [{"context": context}])
    assert pred["answer"] == "alpha"
    assert pred["score"] == pytest.approx(np.exp(2) / (np.exp(2) + np.exp(1) + np.exp(0)))


def test_bpe_offsets_with_leading_spaces_are_trimmed():
    tokenizer = bpe_tokenizer("chatml", add_prefix_space=True)
    task = qa(max_length=64)
    context = "Tim Cook leads Apple in Cupertino."
    row = task.validate(
        {
            "context": context,
            "question": "Where?",
            "answers": {"text": ["Cupertino"], "answer_start": [24]},
        }
    )
    windows = task.encode_row(row, tokenizer)
    [pred] = task.decode([perfect_windows(windows)], [row])
    assert (pred["answer"], pred["start"], pred["end"]) == ("Cupertino", 24, 33)


# ----- metrics ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prediction", "golds", "em", "f1"),
    [
        ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),
        ("an  Apple, Inc.", ["apple inc"], 1.0, 1.0),
        ("in Paris, France", ["Paris"], 0.0, 0.5),
        ("Paris", ["in Paris, France"], 0.0, 2 * (1 / 3) / (1 + 1 / 3)),
        ("Sir Christopher Wren", ["Sir Christopher Wren", "Christopher Wren"], 1.0, 1.0),
        ("Wren", ["Sir Christopher Wren", "Christopher Wren"], 0.0, 2 * 0.5 / 1.5),
        ("London", ["Paris"], 0.0, 0.0),
        ("", [], 1.0, 1.0),
        ("something", [], 0.0, 0.0),
    ],
)
def test_squad_metrics(prediction, golds, em, f1):
    task = qa()
    rows = [{"context": "c", "question": "q", "answers": {"text": golds, "answer_start": []}}]
    scores = task.metrics([{"answer": prediction}], rows)
    assert scores["exact_match"] == pytest.approx(em)
    assert scores["f1"] == pytest.approx(f1)


def test_squad_metrics_average_over_rows():
    task = qa()
    rows = [
        {"context": "c", "question": "q", "answers": {"text": ["a tun"], "answer_start": [0]}},
        {"context": "c", "question": "q"},  # inference row: counts as unanswerable
    ]
    scores = task.metrics([{"answer": "Tun."}, {"answer": "x"}], rows)
    assert scores == {"exact_match": 0.5, "f1": 0.5, "count": 2.0}
