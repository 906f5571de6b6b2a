"""Summarization: ``document`` → ``summary`` (encoder-decoder or causal LM; ROUGE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tasks.lm import Text, TextToTextTask
from tasks.metrics import rouge_scores


class SummarizationRow(Text):
    """A document and its reference summary."""

    document: str
    summary: str | None = None


class SummarizationTask(TextToTextTask):
    """Abstractive summarisation."""

    name: ClassVar[str] = "summarization"
    description: ClassVar[str] = "document → summary (ROUGE-1/2/L)"
    formulations: ClassVar[dict[str, str]] = {"seq2seq": "seq2seq_lm", "causal": "causal_lm"}
    row_schema: ClassVar[type[SummarizationRow]] = SummarizationRow
    space_before_target: ClassVar[bool] = True
    target_field: ClassVar[str] = "summary"
    prompt_template: ClassVar[str] = "Summarize:\n{document}\nSummary:"
    source_template: ClassVar[str] = "summarize: {document}"

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        return rouge_scores([p["text"] for p in predictions], [r["summary"] for r in rows])
