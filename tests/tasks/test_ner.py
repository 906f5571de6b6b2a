"""The NER task: both row shapes, sub-word alignment, IOB2 repair, decoding, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from seqeval.metrics import f1_score, precision_score, recall_score

from tasks.base import IGNORE_INDEX, RowError, TaskError
from tasks.ner import NerTask, repair_iob2, split_words
from tests.conftest import read_jsonl
from tests.toy_tokenizers import bpe_tokenizer

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "fixtures" / "ner.jsonl"
LABELS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
NAMES = {"PER": "Person", "ORG": "Organization", "LOC": "Location", "MISC": "Miscellaneous"}


def ner(max_length: int = 256, labels=LABELS) -> NerTask:
    return NerTask(max_length=max_length, labels=list(labels))


@pytest.fixture(scope="module")
def fixture_rows() -> list[dict]:
    return read_jsonl(FIXTURE)


@pytest.fixture()
def tokenizer(word_tokenizer):
    return word_tokenizer


def perfect_outputs(task: NerTask, features: dict) -> dict:
    """Logits that put all their mass on the encoded gold label of each labelled position."""
    labels = features["labels"]
    logits = np.zeros((len(labels), len(task.labels)))
    for pos, label in enumerate(labels):
        if label != IGNORE_INDEX:
            logits[pos, label] = 10.0
    return {"logits": logits, "word_ids": features["word_ids"]}


def one_hot_outputs(task: NerTask, tags: list[str], features: dict) -> dict:
    """Logits predicting ``tags[w]`` at the first sub-token of each word ``w`` that fits."""
    logits = np.zeros((len(features["input_ids"]), len(task.labels)))
    seen = set()
    for pos, w in enumerate(features["word_ids"]):
        if w >= 0 and w not in seen:
            seen.add(w)
            logits[pos, task.label2id[tags[w]]] = 10.0
    return {"logits": logits, "word_ids": features["word_ids"]}


def expected_entities(tokens: list[str], tags: list[str]) -> list[tuple[str, str, int, int]]:
    """(surface, code, start, end) of each entity of a tokens row, over " ".join(tokens)."""
    starts, pos = [], 0
    for word in tokens:
        starts.append(pos)
        pos += len(word) + 1
    found, i = [], 0
    while i < len(tags):
        if tags[i].startswith("B-"):
            code, j = tags[i][2:], i + 1
            while j < len(tags) and tags[j] == f"I-{code}":
                j += 1
            surface = " ".join(tokens[i:j])
            found.append((surface, code, starts[i], starts[i] + len(surface)))
            i = j
        else:
            i += 1
    return found


# ----- rows ------------------------------------------------------------------------------------
def test_every_fixture_row_validates_in_both_shapes(fixture_rows):
    task = NerTask()
    shapes = {"tokens": 0, "text": 0}
    for raw in fixture_rows:
        row = task.validate(raw)
        shapes["tokens" if "tokens" in raw else "text"] += 1
        assert len(row["tags"]) == len(row["tokens"]) == len(row["token_spans"])
        for word, (start, end) in zip(row["tokens"], row["token_spans"], strict=True):
            assert row["text"][start:end] == word
        if "tokens" in raw:
            assert row["text"] == " ".join(raw["tokens"])
            assert row["tags"] == raw["tags"]
        else:
            assert row["text"] == raw["text"]
    assert shapes["tokens"] > 0 and shapes["text"] > 0


def test_text_rows_are_split_into_words_and_tagged():
    task = NerTask()
    row = task.validate(
        {
            "text": "Amazon's Stockholm-based unit hired O'Neill.",
            "entities": [
                {"start": 0, "end": 6, "label": "ORG"},
                {"start": 9, "end": 18, "label": "LOC"},
                {"start": 36, "end": 43, "label": "PER"},
            ],
        }
    )
    assert row["tokens"] == [
        "Amazon", "'s", "Stockholm", "-", "based", "unit", "hired", "O'Neill", ".",
    ]  # fmt: skip
    assert row["tags"] == ["B-ORG", "O", "B-LOC", "O", "O", "O", "O", "B-PER", "O"]
    assert split_words("It cost $1,500.")[0] == ["It", "cost", "$", "1,500", "."]


def test_iob1_gold_is_repaired_to_iob2():
    row = NerTask().validate(
        {"tokens": ["Tim", "Cook", "Apple"], "tags": ["I-PER", "I-PER", "B-ORG"]}
    )
    assert row["tags"] == ["B-PER", "I-PER", "B-ORG"]
    assert repair_iob2(["O", "I-PER", "I-PER", "O", "B-ORG", "I-LOC"]) == [
        "O", "B-PER", "I-PER", "O", "B-ORG", "B-LOC",
    ]  # fmt: skip


def test_inference_rows_need_no_gold():
    task = ner()
    row = task.validate({"text": "Tim Cook visited Paris."})
    assert row["tokens"] == ["Tim", "Cook", "visited", "Paris", "."]
    assert "tags" not in row
    assert "labels" not in task.encode_row(row, bpe_tokenizer("chatml", add_prefix_space=True))
    assert task.validate({"tokens": ["a", "b"]})["text"] == "a b"


def test_normalised_rows_validate_again_unchanged(fixture_rows):
    task = ner()
    for raw in fixture_rows:
        row = task.validate(raw)
        assert task.validate(row) == row


TEXT = "Tim Cook runs Apple."


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"tags": ["O"]}, "tokens", "missing"),
        ({"tokens": [], "tags": []}, "tokens", "non-empty"),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, "tokens", "word 1 is empty"),
        ({"tokens": "Tim Cook", "tags": ["B-PER", "I-PER"]}, "tokens", "list"),
        ({"tokens": ["Tim", "Cook"], "tags": ["B-PER"]}, "tags", "1 tags for 2 tokens"),
        ({"tokens": ["Tim", "Cook"], "tags": ["B-PER", "PER"]}, "tags", "tag 1 is 'PER'"),
        ({"tokens": ["Tim"], "tags": ["X-PER"]}, "tags", "expected 'O'"),
        ({"tokens": ["Tim"], "tags": ["B-"]}, "tags", "expected 'O'"),
        ({"tokens": ["Tim"], "tags": ["B-DATE"]}, "tags", "not in the label set"),
        ({"tokens": ["Tim"], "entities": []}, "entities", "need 'text'"),
        ({"text": "   ", "entities": []}, "text", "non-empty"),
        ({"text": "", "entities": []}, "text", "non-empty"),
        ({"text": TEXT, "tags": ["O"]}, "tags", "need 'tokens'"),
        (
            {"text": TEXT, "entities": [{"start": 14, "end": 25, "label": "ORG"}]},
            "entities",
            "entity 0 (14-25 ORG) is outside the text",
        ),
        (
            {"text": TEXT, "entities": [{"start": -1, "end": 3, "label": "PER"}]},
            "entities",
            "outside the text",
        ),
        (
            {"text": TEXT, "entities": [{"start": 3, "end": 3, "label": "PER"}]},
            "entities",
            "empty",
        ),
        (
            {
                "text": TEXT,
                "entities": [
                    {"start": 0, "end": 8, "label": "PER"},
                    {"start": 4, "end": 8, "label": "PER"},
                ],
            },
            "entities",
            "entity 1 (4-8 PER) overlaps entity 0",
        ),
        (
            {"text": TEXT, "entities": [{"start": 1, "end": 8, "label": "PER"}]},
            "entities",
            "entity 0 (1-8 PER) 'im Cook' does not start at a word boundary",
        ),
        (
            {"text": TEXT, "entities": [{"start": 0, "end": 7, "label": "PER"}]},
            "entities",
            "does not end at a word boundary",
        ),
        (
            {"text": TEXT, "entities": [{"start": 0, "end": 3, "label": ""}]},
            "entities.0.label",
            "entity type",
        ),
        ({"text": TEXT, "entities": [{"start": 0, "label": "PER"}]}, "entities.0.end", "missing"),
        ({"tokens": ["a", "b"], "text": "a c"}, "text", "token 1 'b' is not next"),
    ],
)
def test_malformed_rows_name_the_field(row, field, fragment):
    with pytest.raises(RowError) as info:
        ner().validate(row)
    assert info.value.field == field
    assert fragment in info.value.reason


# ----- labels ----------------------------------------------------------------------------------
def test_inferred_label_set_is_o_then_bio_pairs_by_type(fixture_rows):
    task = NerTask()
    found: set[str] = set()
    for raw in fixture_rows:
        found.update(task.label_values(task.validate(raw)))
    assert task.sort_labels(found) == LABELS
    # Counterparts of types seen only once (only B- here) are included.
    assert task.sort_labels({"B-PER", "O", "I-DATE"}) == ["O", "B-DATE", "I-DATE", "B-PER", "I-PER"]
    assert task.sort_labels({"O"}) == ["O"]


def test_configured_label_sets_keep_their_order():
    task = ner(labels=["O", "B-PER", "I-PER", "B-ORG"])
    assert task.labels == ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    assert task.label2id["B-PER"] == 1
    with pytest.raises(TaskError, match="include 'O'"):
        ner(labels=["B-PER", "I-PER"])
    with pytest.raises(TaskError, match="'B-TYPE'"):
        ner(labels=["O", "PER"])


# ----- encoding / decoding -----------------------------------------------------------------------
def test_labels_sit_on_the_first_sub_token_of_each_word(fixture_rows, tokenizer):
    task = ner()
    for raw in fixture_rows:
        row = task.validate(raw)
        features = task.encode_row(row, tokenizer)
        enc = tokenizer(row["tokens"], is_split_into_words=True, truncation=True, max_length=256)
        word_ids = enc.word_ids()
        first = {}
        for pos, w in enumerate(word_ids):
            if w is not None and w not in first:
                first[w] = pos
        labelled = [pos for pos, label in enumerate(features["labels"]) if label != IGNORE_INDEX]
        assert labelled == sorted(first.values())
        assert len(first) == len(row["tokens"])  # no word lost at this max_length
        for w, pos in first.items():
            assert features["labels"][pos] == task.label2id[row["tags"][w]]
        assert features["word_ids"] == [-1 if w is None else w for w in word_ids]
        assert features["input_ids"] == list(enc["input_ids"])
        assert len(features["attention_mask"]) == len(features["labels"])


def test_perfect_logits_restore_gold_tags_and_entities(fixture_rows, tokenizer):
    task = ner()
    rows = [task.validate(raw) for raw in fixture_rows]
    outputs = [perfect_outputs(task, task.encode_row(row, tokenizer)) for row in rows]
    predictions = task.decode(outputs, rows)
    n_entities = 0
    for raw, row, pred in zip(fixture_rows, rows, predictions, strict=True):
        assert pred["tags"] == row["tags"]
        got = [(e["text"], e["label"], e["start"], e["end"]) for e in pred["entities"]]
        if "tokens" in raw:
            want = expected_entities(raw["tokens"], raw["tags"])
        else:
            want = [
                (raw["text"][e["start"] : e["end"]], e["label"], e["start"], e["end"])
                for e in sorted(raw["entities"], key=lambda e: e["start"])
            ]
        assert got == [(text, NAMES[code], start, end) for text, code, start, end in want]
        for name in NAMES.values():
            assert pred[name] == [text for text, label, _, _ in got if label == name]
        n_entities += len(got)
    assert n_entities > 50
    assert task.metrics(predictions, rows)["f1"] == 1.0


def test_decoding_repairs_invalid_iob2(minilm_tokenizer):
    task = ner()
    row = task.validate({"tokens": ["x", "Tim", "Cook", "of", "Apple", "Paris"]})
    features = task.encode_row(row, minilm_tokenizer)
    bad = ["O", "I-PER", "I-PER", "O", "B-ORG", "I-LOC"]
    [pred] = task.decode([one_hot_outputs(task, bad, features)], [row])
    assert pred["tags"] == ["O", "B-PER", "I-PER", "O", "B-ORG", "B-LOC"]
    assert pred["entities"] == [
        {"text": "Tim Cook", "label": "Person", "start": 2, "end": 10},
        {"text": "Apple", "label": "Organization", "start": 14, "end": 19},
        {"text": "Paris", "label": "Location", "start": 20, "end": 25},
    ]
    assert pred["Person"] == ["Tim Cook"] and pred["Miscellaneous"] == []


def test_words_past_max_length_are_decoded_as_o(tokenizer):
    task = ner(max_length=8)
    tokens = ["Paris"] * 20
    row = task.validate({"tokens": tokens, "tags": ["B-LOC"] * 20})
    features = task.encode_row(row, tokenizer)
    assert len(features["input_ids"]) == 8
    fitted = {w for w in features["word_ids"] if w >= 0}
    assert 0 < len(fitted) < 20
    [pred] = task.decode([perfect_outputs(task, features)], [row])
    assert pred["tags"] == ["B-LOC" if w in fitted else "O" for w in range(20)]
    assert len(pred["Location"]) == len(fitted)


def test_decoding_original_text_spans(minilm_tokenizer):
    task = ner()
    raw = {"text": "  Dr.  Priya Patel joined  Goldman Sachs.", "entities": []}
    row = task.validate(raw)
    features = task.encode_row(row, minilm_tokenizer)
    tags = ["O", "O", "B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O"]
    [pred] = task.decode([one_hot_outputs(task, tags, features)], [row])
    assert [(e["text"], e["start"], e["end"]) for e in pred["entities"]] == [
        ("Priya Patel", 7, 18),
        ("Goldman Sachs", 27, 40),
    ]


# ----- metrics ---------------------------------------------------------------------------------
def test_metrics_equal_seqeval():
    task = ner()
    gold = [
        ["B-PER", "I-PER", "O", "B-ORG", "O"],
        ["B-LOC", "O", "B-MISC", "I-MISC"],
        ["O", "O", "B-PER"],
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-LOC", "O"],
        ["B-LOC", "O", "B-MISC", "O"],
        ["O", "O", "B-PER"],
    ]
    rows = [task.validate({"tokens": ["w"] * len(g), "tags": g}) for g in gold]
    scores = task.metrics([{"tags": p} for p in pred], rows)
    assert scores["f1"] == pytest.approx(f1_score(gold, pred))
    assert scores["precision"] == pytest.approx(precision_score(gold, pred))
    assert scores["recall"] == pytest.approx(recall_score(gold, pred))
    assert scores["f1"] == pytest.approx(2 * 3 / (5 + 5))
    with pytest.raises(ValueError, match="predicted tags"):
        task.metrics([{"tags": ["O"]}], rows[:1])
