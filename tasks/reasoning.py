"""Reasoning: ``question`` → chain of thought (``rationale``) + a final ``answer`` line."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from tasks.lm import Text, TextToTextTask
from tasks.metrics import answers_equal

ANSWER_PREFIX = "Answer:"
_ANSWER_LINE = re.compile(r"Answer:\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The text after the last ``Answer:``; without one, the last non-empty line."""
    found = _ANSWER_LINE.findall(text)
    if found:
        return found[-1].strip().rstrip(".").strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class ReasoningRow(Text):
    """A question with worked steps and the final answer."""

    question: str
    rationale: str | None = None
    answer: str | None = None


class ReasoningTask(TextToTextTask):
    """Chain-of-thought fine-tuning; the loss covers the rationale and the answer line."""

    name: ClassVar[str] = "reasoning"
    description: ClassVar[str] = "question → steps + final answer (final-answer accuracy)"
    formulations: ClassVar[dict[str, str]] = {"causal": "causal_lm"}
    row_schema: ClassVar[type[ReasoningRow]] = ReasoningRow
    target_field: ClassVar[str] = "rationale"
    prompt_template: ClassVar[str] = "Question: {question}\nLet's think step by step.\n"
    source_template: ClassVar[str] = "{question}"

    def target(self, row: dict[str, Any]) -> str:
        rationale = super().target(row)
        if "answer" not in row:
            from tasks.base import RowError

            raise RowError("answer", "missing field (needed to train or evaluate)")
        return f"{rationale.strip()}\n{ANSWER_PREFIX} {row['answer'].strip()}"

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        out = []
        for text in outputs:
            text = str(text).strip()
            body = text.rsplit(ANSWER_PREFIX, 1)[0] if ANSWER_PREFIX in text else text
            steps = [line.strip() for line in body.splitlines() if line.strip()]
            out.append({"text": text, "steps": steps, "answer": extract_answer(text)})
        return out

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        if not rows:
            return {"accuracy": 0.0}
        hits = sum(
            answers_equal(p["answer"], r["answer"]) for p, r in zip(predictions, rows, strict=True)
        )
        return {"accuracy": hits / len(rows)}
