"""Generation: ``prompt`` → ``completion`` with a causal LM (loss on the completion + EOS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tasks.lm import Text, TextToTextTask
from tasks.metrics import rouge_scores, squad_scores


class GenerationRow(Text):
    """A prompt and the completion to learn."""

    prompt: str
    completion: str | None = None


class GenerationTask(TextToTextTask):
    """Free-form continuation of a prompt."""

    name: ClassVar[str] = "generation"
    description: ClassVar[str] = "prompt → completion (ROUGE-L, exact match)"
    formulations: ClassVar[dict[str, str]] = {"causal": "causal_lm"}
    row_schema: ClassVar[type[GenerationRow]] = GenerationRow
    target_field: ClassVar[str] = "completion"
    prompt_template: ClassVar[str] = "{prompt}"
    source_template: ClassVar[str] = "{prompt}"

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        preds = [p["text"] for p in predictions]
        refs = [r["completion"] for r in rows]
        out = rouge_scores(preds, refs, types=("rougeL",))
        out["exact_match"] = squad_scores(preds, [[r] for r in refs])["exact_match"]
        return out
