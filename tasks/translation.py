"""Translation: ``source`` (+ language pair) → ``target`` (sacreBLEU, chrF)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import Field

from tasks.lm import Text, TextToTextTask
from tasks.metrics import bleu_chrf

LANGUAGES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ro": "Romanian", "ru": "Russian", "zh": "Chinese",
    "ja": "Japanese",
}  # fmt: skip


class TranslationRow(Text):
    """A sentence pair with ISO 639-1 language codes."""

    source: str
    target: str | None = None
    source_lang: str = Field(pattern=r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
    target_lang: str = Field(pattern=r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")


class TranslationTask(TextToTextTask):
    """Sentence translation; the prompt names both languages (T5-style for seq2seq)."""

    name: ClassVar[str] = "translation"
    description: ClassVar[str] = "source (+ language pair) → target (sacreBLEU, chrF)"
    formulations: ClassVar[dict[str, str]] = {"seq2seq": "seq2seq_lm", "causal": "causal_lm"}
    row_schema: ClassVar[type[TranslationRow]] = TranslationRow
    space_before_target: ClassVar[bool] = True
    target_field: ClassVar[str] = "target"
    prompt_template: ClassVar[str] = (
        "Translate {source_name} to {target_name}:\n{source}\n{target_name}:"
    )
    source_template: ClassVar[str] = "translate {source_name} to {target_name}: {source}"

    def _fill(self, template: str, row: dict[str, Any]) -> str:
        names = {
            "source_name": LANGUAGES.get(row["source_lang"], row["source_lang"]),
            "target_name": LANGUAGES.get(row["target_lang"], row["target_lang"]),
        }
        return super()._fill(template, {**row, **names})

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        return bleu_chrf([p["text"] for p in predictions], [r["target"] for r in rows])
