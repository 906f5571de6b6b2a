"""Generative QA: ``question`` (+ optional ``context``) → free-text ``answer``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tasks.lm import Text, TextToTextTask
from tasks.metrics import rouge_scores, squad_scores


class GenerativeQARow(Text):
    """A question, optionally with the context that answers it."""

    question: str
    context: str | None = None
    answer: str | None = None


class GenerativeQATask(TextToTextTask):
    """Open or closed-book QA answered by generation (SQuAD EM/F1, ROUGE-L)."""

    name: ClassVar[str] = "generative_qa"
    description: ClassVar[str] = "(context,) question → answer (EM, F1, ROUGE-L)"
    formulations: ClassVar[dict[str, str]] = {"causal": "causal_lm", "seq2seq": "seq2seq_lm"}
    row_schema: ClassVar[type[GenerativeQARow]] = GenerativeQARow
    space_before_target: ClassVar[bool] = True
    target_field: ClassVar[str] = "answer"
    prompt_template: ClassVar[str] = "{context_block}Question: {question}\nAnswer:"
    source_template: ClassVar[str] = "question: {question}{context_suffix}"

    def _fill(self, template: str, row: dict[str, Any]) -> str:
        context = row.get("context")
        extra = {
            "context_block": f"Context: {context}\n" if context else "",
            "context_suffix": f" context: {context}" if context else "",
        }
        return super()._fill(template, {**row, **extra})

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        preds = [p["text"] for p in predictions]
        golds = [r["answer"] for r in rows]
        out = squad_scores(preds, [[g] for g in golds])
        out.update(rouge_scores(preds, golds, types=("rougeL",)))
        return out
