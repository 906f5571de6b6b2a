"""Named-entity recognition: words → IOB2 tags, decoded to typed entity spans.

Formulation ``token_classification``: an encoder with a per-token classification head. Each
word's label sits on its FIRST sub-token; the other sub-tokens and the special tokens carry
``IGNORE_INDEX`` so the loss and the prediction see exactly one position per word.

Rows come in two shapes, both normalised to ``tokens`` + ``tags`` (IOB2) + ``text`` +
``token_spans`` (the character span of each token in ``text``):

* ``{"tokens": [...], "tags": [...]}``: pre-split words with IOB2 (or IOB1) tags; ``text`` is
  the words joined by single spaces;
* ``{"text": "...", "entities": [{"start", "end", "label"}]}``: character offsets (end
  exclusive) into a raw text, which is split into words (punctuation split off) and tagged.

Decoded predictions carry character spans into ``text``, so for the second shape they point
into the caller's original string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.base import IGNORE_INDEX, RowError, Task, TaskError
from tasks.metrics import entity_scores

WORD_RE = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’](?![sS]\b)\w+)*|['’][sS]\b|[^\w\s]")
"""Words of a raw text: numbers with their inner separators ("1,500", "5.25"), runs of word
characters, the possessive clitic "'s" on its own, and every other non-space character alone.

Inner apostrophes stay ("O'Neill", "don't") but "'s" is split off and so are hyphens (the
Penn Treebank / OntoNotes conventions): entities often end right before them ("Amazon's",
"Stockholm-based"), and raw-text training rows and inference rows must split the same way,
so the split cannot depend on where the gold entities are."""

_TAG_RE = re.compile(r"^(?:O|[BI]-\S+)$")

ENTITY_NAMES: dict[str, str] = {
    "PER": "Person",
    "ORG": "Organization",
    "LOC": "Location",
    "MISC": "Miscellaneous",
}
"""The full names under which the CoNLL types are returned; other types keep their code."""


def entity_name(code: str) -> str:
    """The full name of an entity type code (``PER`` → ``Person``); unknown codes unchanged."""
    return ENTITY_NAMES.get(code, code)


def split_words(text: str) -> tuple[list[str], list[list[int]]]:
    """Split raw text into words (see ``WORD_RE``) and their ``[start, end)`` char spans."""
    words, spans = [], []
    for match in WORD_RE.finditer(text):
        words.append(match.group())
        spans.append([match.start(), match.end()])
    return words, spans


def repair_iob2(tags: Sequence[str]) -> list[str]:
    """Make a tag sequence valid IOB2 the conlleval way.

    An ``I-X`` that does not continue a ``B-X``/``I-X`` opens a new entity, so it becomes
    ``B-X``. This is also exactly how IOB1 input reads, so it converts IOB1 to IOB2 without
    changing which entities seqeval/conlleval find.
    """
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def tag_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of a valid IOB2 sequence as ``(type, first word, last word)`` (inclusive)."""
    chunks: list[tuple[str, int, int]] = []
    current: list[Any] | None = None
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and current is not None and current[0] == tag[2:]:
            current[2] = i
            continue
        if current is not None:
            chunks.append((current[0], current[1], current[2]))
            current = None
        if tag != "O":
            # A B-X (or, defensively, an orphan I-X) opens an entity.
            current = [tag[2:], i, i]
    if current is not None:
        chunks.append((current[0], current[1], current[2]))
    return chunks


class NerEntity(BaseModel):
    """One gold entity of a raw-text row: ``text[start:end]`` is of type ``label``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    start: int = Field(description="character offset of the first character")
    end: int = Field(description="character offset one past the last character")
    label: str = Field(description="entity type code, e.g. PER, ORG, LOC, MISC")

    @field_validator("label")
    @classmethod
    def _type_code(cls, value: str) -> str:
        value = value.strip()
        if not value or any(ch.isspace() for ch in value) or value == "O":
            raise ValueError("must be an entity type such as PER (no spaces, not 'O')")
        return value


class NerRow(BaseModel):
    """A tagged sentence: ``tokens`` + ``tags``, or ``text`` + ``entities`` (char offsets).

    The gold part (``tags`` / ``entities``) is optional so that inference rows validate.
    ``token_spans`` only appears in normalised rows (it is filled in by validation).
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str | None = Field(default=None, description="optional row identifier")
    tokens: list[str] | None = Field(default=None, description="the words of the sentence")
    tags: list[str] | None = Field(default=None, description="one IOB2 tag per word")
    text: str | None = Field(default=None, description="raw text (with entities)")
    entities: list[NerEntity] | None = Field(
        default=None, description="gold entities as character offsets into text"
    )
    token_spans: list[list[int]] | None = Field(
        default=None, description="char [start, end) of each token in text (normalised rows)"
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id_str(cls, value: Any) -> Any:
        # Integer ids are common in datasets; they are kept as strings.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("tokens")
    @classmethod
    def _words(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must be a non-empty list of words")
        for i, word in enumerate(value):
            # An empty word yields no sub-token, so it could never be labelled or predicted.
            if not word.strip():
                raise ValueError(f"word {i} is empty")
        return value

    @field_validator("text")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value


class NerTask(Task):
    """Token classification of words into IOB2 entity tags with an encoder.

    Words past ``max_length`` (after sub-word tokenisation) are truncated away: they get no
    label in training and are decoded as ``O``.
    """

    name: ClassVar[str] = "ner"
    description: ClassVar[str] = "words → IOB2 entity tags / typed entity spans (entity F1)"
    formulations: ClassVar[dict[str, str]] = {"token_classification": "token_classification"}
    row_schema: ClassVar[type[NerRow]] = NerRow
    uses_label_set: ClassVar[bool] = True

    # ----- labels ---------------------------------------------------------------------------
    def set_labels(self, labels: Iterable[str]) -> None:
        """Fix the tag set: ``O`` plus ``B-X``/``I-X`` tags, in the order given.

        A type present with only one of its ``B-``/``I-`` tags gets the other appended at the
        end, so the given class ids stay as they are and every predicted entity is encodable.
        """
        labels = [str(label) for label in labels]
        for label in labels:
            if not _TAG_RE.match(label):
                raise TaskError(f"NER labels must be 'O', 'B-TYPE' or 'I-TYPE', got {label!r}")
        if "O" not in labels:
            raise TaskError(f"NER labels must include 'O', got {labels}")
        full = list(labels)
        for label in labels:
            if label != "O":
                for prefix in ("B-", "I-"):
                    counterpart = prefix + label[2:]
                    if counterpart not in full:
                        full.append(counterpart)
        super().set_labels(full)

    @staticmethod
    def sort_labels(values: Iterable[str]) -> list[str]:
        """The inferred tag set: ``O``, then ``B-X``, ``I-X`` for each type ``X`` in sorted order.

        Both tags of every type seen are included (a type may only ever be one word long in
        the data, yet the model must be able to predict its ``I-`` tag).
        """
        types = {v[2:] for v in values if v != "O" and _TAG_RE.match(v)}
        return ["O"] + [f"{prefix}-{t}" for t in sorted(types) for prefix in ("B", "I")]

    def label_values(self, row: dict[str, Any]) -> list[str]:
        return list(row.get("tags", []))

    # ----- rows -----------------------------------------------------------------------------
    def validate(self, row: Any) -> dict[str, Any]:
        """Check one row and normalise it to ``tokens``/``tags``/``text``/``token_spans``.

        Gold tags are repaired to IOB2 (see ``repair_iob2``), which keeps their entities.
        """
        clean = super().validate(row)
        if "tokens" in clean:
            out = self._from_tokens(clean)
        elif "text" in clean:
            out = self._from_text(clean)
        else:
            raise RowError(
                "tokens", "missing field (give 'tokens' with 'tags', or 'text' with 'entities')"
            )
        if "id" in clean:
            out["id"] = clean["id"]
        if "tags" in out and self.labels is not None:
            known = set(self.labels)
            for i, tag in enumerate(out["tags"]):
                if tag not in known:
                    raise RowError(
                        "tags",
                        f"tag {i} {tag!r} is not in the label set ({', '.join(self.labels)})",
                    )
        return out

    @staticmethod
    def _from_tokens(clean: dict[str, Any]) -> dict[str, Any]:
        tokens: list[str] = clean["tokens"]
        if "entities" in clean:
            raise RowError("entities", "rows with 'tokens' take 'tags'; 'entities' need 'text'")
        if "text" in clean and "token_spans" in clean:
            # A row that was normalised before: keep its text and spans if they agree.
            text, spans = clean["text"], clean["token_spans"]
            if len(spans) != len(tokens):
                raise RowError("token_spans", f"{len(spans)} spans for {len(tokens)} tokens")
            for i, (span, word) in enumerate(zip(spans, tokens, strict=True)):
                bad = len(span) != 2 or not 0 <= span[0] < span[1] <= len(text)
                if bad or text[span[0] : span[1]] != word:
                    raise RowError("token_spans", f"span {i} {span} does not cover {word!r}")
        elif "text" in clean:
            # The caller's own text: find the tokens in it, so spans point into that text.
            text, spans = clean["text"], _align(clean["text"], tokens)
        else:
            text = " ".join(tokens)
            spans, pos = [], 0
            for word in tokens:
                spans.append([pos, pos + len(word)])
                pos += len(word) + 1
        out: dict[str, Any] = {"tokens": tokens, "text": text, "token_spans": spans}
        if "tags" in clean:
            tags = clean["tags"]
            if len(tags) != len(tokens):
                raise RowError("tags", f"{len(tags)} tags for {len(tokens)} tokens")
            _check_tags(tags)
            out["tags"] = repair_iob2(tags)
        return out

    @staticmethod
    def _from_text(clean: dict[str, Any]) -> dict[str, Any]:
        text: str = clean["text"]
        if "tags" in clean:
            raise RowError("tags", "'tags' need 'tokens'; raw-text rows take 'entities'")
        words, spans = split_words(text)
        if not words:
            raise RowError("text", "has no words")
        out: dict[str, Any] = {"tokens": words, "text": text, "token_spans": spans}
        if "entities" in clean:
            out["tags"] = _entities_to_tags(text, clean["entities"], spans)
        return out

    # ----- encoding -------------------------------------------------------------------------
    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
        """Sub-word features with labels on each word's first sub-token.

        ``word_ids`` gives, per position, the index of the word it belongs to, or -1 for
        special tokens; decoding reads the prediction at the first position of each word.
        Words that do not fit in ``max_length`` have no position (decoded as ``O``).
        Byte-level BPE tokenizers need ``add_prefix_space=True`` to take pre-split words.
        """
        enc = tokenizer(
            row["tokens"], is_split_into_words=True, truncation=True, max_length=self.max_length
        )
        word_ids = enc.word_ids()
        features: dict[str, Any] = {k: list(enc[k]) for k in _FEATURE_KEYS if k in enc}
        features["word_ids"] = [-1 if w is None else int(w) for w in word_ids]
        if "tags" in row:
            label2id = self.label2id
            labels, seen = [], set()
            for w in word_ids:
                if w is None or w in seen:
                    labels.append(IGNORE_INDEX)
                    continue
                seen.add(w)
                tag = row["tags"][w]
                if tag not in label2id:
                    raise RowError("tags", f"tag {tag!r} is not in the label set {self.labels}")
                labels.append(label2id[tag])
            features["labels"] = labels
        return features

    # ----- decoding and metrics -------------------------------------------------------------
    def decode(
        self, outputs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Per-row ``{"logits": [seq, num_labels], "word_ids"}`` → tags and entities.

        Each word takes the argmax at its first sub-token (the first position whose word id is
        that word); words without a position are ``O``. Tags are repaired to IOB2, then every
        entity is returned with its type's full name and its ``[start, end)`` characters in
        ``row["text"]``, and each type in the label set also gets a key (its full name) listing
        the surface strings found. ``rows`` (the validated rows) are required.
        """
        if self.labels is None:
            raise TaskError("ner task has no label set")
        if rows is None or len(rows) != len(outputs):
            raise ValueError("ner decoding needs the validated rows, one per output")
        types = [label[2:] for label in self.labels if label.startswith("B-")]
        results = []
        for out, row in zip(outputs, rows, strict=True):
            logits = np.asarray(out["logits"], dtype=np.float64)
            word_ids = [int(w) for w in np.asarray(out["word_ids"]).reshape(-1)]
            n_words = len(row["tokens"])
            tags = ["O"] * n_words
            done: set[int] = set()
            for pos, w in enumerate(word_ids[: len(logits)]):
                if w < 0 or w >= n_words or w in done:
                    continue
                done.add(w)
                tags[w] = self.labels[int(logits[pos].argmax())]
            tags = repair_iob2(tags)
            results.append(self._entities(tags, row, types))
        return results

    @staticmethod
    def _entities(tags: list[str], row: dict[str, Any], types: list[str]) -> dict[str, Any]:
        text, spans = row["text"], row["token_spans"]
        entities = []
        by_type: dict[str, list[str]] = {entity_name(t): [] for t in types}
        for code, first, last in tag_chunks(tags):
            start, end = spans[first][0], spans[last][1]
            name = entity_name(code)
            entities.append({"text": text[start:end], "label": name, "start": start, "end": end})
            by_type.setdefault(name, []).append(text[start:end])
        result: dict[str, Any] = {"tags": tags, "entities": entities}
        for name, surfaces in by_type.items():
            # A type literally named like a result field must not overwrite it.
            if name not in result:
                result[name] = surfaces
        return result

    def metrics(
        self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        """Entity precision/recall/F1 (seqeval, CoNLL mode) and token accuracy."""
        if len(predictions) != len(rows):
            raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
        gold = [row["tags"] for row in rows]
        pred = [p["tags"] for p in predictions]
        for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
            if len(g) != len(p):
                raise ValueError(f"row {i}: {len(p)} predicted tags for {len(g)} gold tags")
        if not rows:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0, "count": 0.0}
        return {**entity_scores(gold, pred), "count": float(len(rows))}


def _align(text: str, tokens: Sequence[str]) -> list[list[int]]:
    """Char spans of ``tokens`` found in order in ``text``, separated only by whitespace."""
    spans, pos = [], 0
    for i, word in enumerate(tokens):
        start = text.find(word, pos)
        if start < 0 or text[pos:start].strip():
            raise RowError("text", f"token {i} {word!r} is not next in the text (at char {pos})")
        spans.append([start, start + len(word)])
        pos = start + len(word)
    if text[pos:].strip():
        raise RowError("text", f"text goes on after the last token (char {pos})")
    return spans


def _check_tags(tags: Sequence[str]) -> None:
    for i, tag in enumerate(tags):
        if not _TAG_RE.match(tag):
            raise RowError("tags", f"tag {i} is {tag!r}; expected 'O', 'B-TYPE' or 'I-TYPE'")


def _entities_to_tags(
    text: str, entities: list[dict[str, Any]], spans: list[list[int]]
) -> list[str]:
    """IOB2 tags of the words from char-offset entities, which must sit on word boundaries."""
    starts = {span[0]: i for i, span in enumerate(spans)}
    ends = {span[1]: i for i, span in enumerate(spans)}
    tags = ["O"] * len(spans)
    taken: dict[int, int] = {}  # word index → the entity that tagged it
    for k, ent in enumerate(entities):
        start, end, label = ent["start"], ent["end"], ent["label"]
        where = f"entity {k} ({start}-{end} {label})"
        if not 0 <= start < end <= len(text):
            raise RowError("entities", f"{where} is outside the text (0-{len(text)}) or empty")
        shown = repr(text[start:end])
        if start not in starts:
            raise RowError("entities", f"{where} {shown} does not start at a word boundary")
        if end not in ends:
            raise RowError("entities", f"{where} {shown} does not end at a word boundary")
        first, last = starts[start], ends[end]
        for w in range(first, last + 1):
            if w in taken:
                raise RowError("entities", f"{where} overlaps entity {taken[w]}")
            taken[w] = k
            tags[w] = ("B-" if w == first else "I-") + label
    return tags


_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")
