"""Extractive question answering: ``question`` + ``context`` → a span of the context (SQuAD).

Formulation ``span``: an encoder with a question-answering head (a start and an end logit per
token). Contexts longer than one window are split into overlapping windows (doc stride); each
window is a training feature whose target is the first gold answer when the window holds it
whole, else the first position (the [CLS] token, "no answer here"). Decoding searches the best
span over all windows of a row and maps it back to character offsets of the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.base import RowError, Task
from tasks.metrics import squad_scores

NO_SPAN = [-1, -1]
"""``offset_mapping`` entry of a token that is not part of the context."""


class QAOptions(BaseModel):
    """Options of the extractive QA family (set under ``task.options`` in a config)."""

    model_config = ConfigDict(extra="forbid")

    doc_stride: int = Field(
        default=128, ge=0, description="tokens of overlap between consecutive context windows"
    )
    max_answer_length: int = Field(
        default=30, ge=1, description="longest answer considered when decoding, in tokens"
    )
    n_best: int = Field(
        default=20, ge=1, description="start and end candidates per window when decoding"
    )
    allow_no_answer: bool = Field(
        default=False, description="SQuAD 2.0: answer nothing when the null score wins"
    )


class SquadAnswers(BaseModel):
    """Gold answers in SQuAD form; empty lists mean the question is unanswerable."""

    model_config = ConfigDict(strict=True, extra="ignore")

    text: list[str] = Field(description="answer strings, each a substring of the context")
    answer_start: list[int] = Field(description="character offset of each answer")

    @model_validator(mode="after")
    def _same_length(self) -> SquadAnswers:
        if len(self.text) != len(self.answer_start):
            raise ValueError(
                f"{len(self.text)} answer texts but {len(self.answer_start)} answer_start values"
            )
        return self


class ExtractiveQARow(BaseModel):
    """A question about a context, with optional gold answers (inference rows have none)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str | None = Field(default=None, description="optional question identifier")
    context: str = Field(description="the passage that contains the answer")
    question: str = Field(description="the question")
    answers: SquadAnswers | None = Field(
        default=None, description='{"text": [...], "answer_start": [...]} (training data)'
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id_str(cls, value: Any) -> Any:
        # SQuAD ids are strings, but other datasets number their rows.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("context", "question")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value


class ExtractiveQATask(Task):
    """Span extraction with an encoder QA head over doc-stride windows of the context."""

    name: ClassVar[str] = "extractive_qa"
    description: ClassVar[str] = "question + context → answer span of the context (SQuAD EM/F1)"
    formulations: ClassVar[dict[str, str]] = {"span": "question_answering"}
    row_schema: ClassVar[type[ExtractiveQARow]] = ExtractiveQARow
    options_schema: ClassVar[type[QAOptions]] = QAOptions

    # ----- rows -----------------------------------------------------------------------------
    def check(self, row: dict[str, Any]) -> None:
        """Each gold answer must be the context's text at its ``answer_start``."""
        answers = row.get("answers")
        if not answers:
            return
        context = row["context"]
        for i, (text, start) in enumerate(
            zip(answers["text"], answers["answer_start"], strict=True)
        ):
            if not text.strip():
                raise RowError(
                    "answers", f"answer {i} is empty (unanswerable rows have empty lists)"
                )
            if not 0 <= start <= len(context) - len(text):
                raise RowError(
                    "answers",
                    f"answer {i} {text!r} at {start} does not fit in the context "
                    f"({len(context)} chars)",
                )
            found = context[start : start + len(text)]
            if found != text:
                raise RowError(
                    "answers",
                    f"answer {i}: context[{start}:{start + len(text)}] is {found!r}, not {text!r}",
                )

    # ----- encoding -------------------------------------------------------------------------
    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
        """One feature per context window (question + a slice of the context).

        Each feature has the model inputs, ``start_positions``/``end_positions`` (token
        indices of the first gold answer, or 0 when the window does not hold it whole or the
        row is unanswerable; absent for inference rows) and ``offset_mapping``: the
        ``[start, end)`` characters in the context of each context token, ``[-1, -1]`` for
        question and special tokens. When the question leaves fewer context tokens per window
        than ``doc_stride``, the overlap is reduced to half a window.
        """
        question, context = row["question"], row["context"]
        n_question = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        room = self.max_length - n_question - tokenizer.num_special_tokens_to_add(pair=True)
        if room < 1:
            raise RowError(
                "question",
                f"the question takes {n_question} tokens, which leaves no room for the context "
                f"within max_length {self.max_length}",
            )
        # The fast tokenizers abort the process (a Rust panic) unless stride < room.
        stride = self.options.doc_stride if self.options.doc_stride < room else room // 2
        enc = tokenizer(
            question,
            context,
            truncation="only_second",
            max_length=self.max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )
        answer: tuple[int, int] | None = None
        answers = row.get("answers")
        if answers and answers["text"]:
            start = answers["answer_start"][0]
            answer = (start, start + len(answers["text"][0]))

        features = []
        for w in range(len(enc["input_ids"])):
            sequence_ids = enc.sequence_ids(w)
            offsets = [
                [int(o[0]), int(o[1])] if s == 1 else list(NO_SPAN)
                for o, s in zip(enc["offset_mapping"][w], sequence_ids, strict=True)
            ]
            feature: dict[str, Any] = {k: list(enc[k][w]) for k in _FEATURE_KEYS if k in enc}
            feature["offset_mapping"] = offsets
            if answers is not None:
                start_pos, end_pos = _answer_tokens(offsets, answer)
                feature["start_positions"] = start_pos
                feature["end_positions"] = end_pos
            features.append(feature)
        return features

    # ----- decoding and metrics -------------------------------------------------------------
    def decode(
        self,
        outputs: Sequence[Sequence[dict[str, Any]]],
        rows: Sequence[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Per row, the windows' ``start_logits``/``end_logits``/``offset_mapping`` → answer.

        Candidates are, in each window, the ``n_best`` best start and end context tokens with
        start ≤ end and at most ``max_answer_length`` tokens; a span's score is its start
        logit plus its end logit, and spans that several windows share count once (best
        score). With ``allow_no_answer`` the null score (start + end logit at position 0,
        the lowest over the windows) competes too. Returned: ``answer`` (``context[start:
        end]``, surrounding whitespace trimmed), character ``start``/``end`` (end exclusive;
        -1 for no answer) and ``score``, the softmax probability of the chosen answer among
        all candidates considered (including the null answer when it competes). ``rows``
        (the validated rows) are required.
        """
        if rows is None or len(rows) != len(outputs):
            raise ValueError("extractive QA decoding needs the validated rows, one per output")
        return [
            self._best_span(windows, row["context"])
            for windows, row in zip(outputs, rows, strict=True)
        ]

    def _best_span(self, windows: Sequence[dict[str, Any]], context: str) -> dict[str, Any]:
        opts = self.options
        spans: dict[tuple[int, int], float] = {}
        null_score = np.inf
        for window in windows:
            start_logits = np.asarray(window["start_logits"], dtype=np.float64).reshape(-1)
            end_logits = np.asarray(window["end_logits"], dtype=np.float64).reshape(-1)
            offsets = np.asarray(window["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            # Logits may be padded past the window's own tokens (batched inference).
            n = min(len(offsets), len(start_logits), len(end_logits))
            if n == 0:
                continue
            null_score = min(null_score, start_logits[0] + end_logits[0])
            ctx = np.flatnonzero((offsets[:n, 0] >= 0) & (offsets[:n, 1] > offsets[:n, 0]))
            if ctx.size == 0:
                continue
            k = min(opts.n_best, ctx.size)
            starts = ctx[np.argsort(-start_logits[ctx], kind="stable")[:k]]
            ends = ctx[np.argsort(-end_logits[ctx], kind="stable")[:k]]
            for s in starts:
                for e in ends:
                    if e < s or e - s + 1 > opts.max_answer_length:
                        continue
                    span = _trim(context, int(offsets[s, 0]), int(offsets[e, 1]))
                    if span is None:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > spans.get(span, -np.inf):
                        spans[span] = score

        with_null = opts.allow_no_answer and np.isfinite(null_score)
        scores = list(spans.values()) + ([float(null_score)] if with_null else [])
        if not scores:
            return {"answer": "", "start": -1, "end": -1, "score": 0.0}
        probs = _softmax(np.asarray(scores))
        best = max(spans, key=spans.__getitem__) if spans else None
        if best is None or (with_null and null_score > spans[best]):
            return {"answer": "", "start": -1, "end": -1, "score": float(probs[-1])}
        index = list(spans).index(best)
        start, end = best
        return {
            "answer": context[start:end],
            "start": start,
            "end": end,
            "score": float(probs[index]),
        }

    def metrics(
        self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
    ) -> dict[str, float]:
        """SQuAD exact match and token F1 (×100), best over the gold answers of each row.

        Unanswerable rows count as the gold answer "" (only an empty prediction matches).
        """
        if len(predictions) != len(rows):
            raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
        golds = [(row.get("answers") or {}).get("text", []) for row in rows]
        scores = squad_scores([p["answer"] for p in predictions], golds)
        return {**scores, "count": float(len(rows))}


def _answer_tokens(offsets: list[list[int]], answer: tuple[int, int] | None) -> tuple[int, int]:
    """Token indices of the answer's first and last token, or (0, 0) if not wholly inside."""
    if answer is None:
        return 0, 0
    start_char, end_char = answer
    ctx = [i for i, o in enumerate(offsets) if o != NO_SPAN]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    # First token ending after the answer starts; last token starting before it ends. Robust
    # to offsets that include a leading space (byte-level BPE without offset trimming).
    start_tok = next(i for i in ctx if offsets[i][1] > start_char)
    end_tok = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
    if end_tok < start_tok:
        return 0, 0
    return start_tok, end_tok


def _trim(context: str, start: int, end: int) -> tuple[int, int] | None:
    """``[start, end)`` without surrounding whitespace, or None when nothing is left."""
    end = min(end, len(context))
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


_FEATURE_KEYS = ("input_ids", "attention_mask", "token_type_ids")
