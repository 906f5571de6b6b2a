"""Task families: row schemas, encodings, decodings and metrics. Pure Python, no Ray."""

from __future__ import annotations

from typing import Any

from tasks.base import IGNORE_INDEX, RowError, Task, TaskError
from tasks.classification import ClassificationTask
from tasks.code import CodeTask
from tasks.dialogue import DialogueTask
from tasks.extractive_qa import ExtractiveQATask
from tasks.generation import GenerationTask
from tasks.generative_qa import GenerativeQATask
from tasks.multimodal import MultimodalTask
from tasks.ner import NerTask
from tasks.nli import NLITask
from tasks.rag import RagTask
from tasks.reasoning import ReasoningTask
from tasks.summarization import SummarizationTask
from tasks.translation import TranslationTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        GenerationTask,
        DialogueTask,
        ClassificationTask,
        NLITask,
        ExtractiveQATask,
        GenerativeQATask,
        NerTask,
        SummarizationTask,
        TranslationTask,
        CodeTask,
        ReasoningTask,
        RagTask,
        MultimodalTask,
    )
}
"""Every task family by name."""


def get_task(
    name: str,
    formulation: str | None = None,
    max_length: int = 512,
    labels: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> Task:
    """Build a task by family name; unknown names raise ``TaskError`` listing the known ones."""
    try:
        cls = TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise TaskError(f"unknown task '{name}' (known tasks: {known})") from None
    return cls(formulation=formulation, max_length=max_length, labels=labels, **(options or {}))


def task_from_spec(spec: dict[str, Any]) -> Task:
    """Rebuild a task from ``Task.spec()`` (as stored in a bundle's ``taskray.json``)."""
    return get_task(**spec)


__all__ = ["IGNORE_INDEX", "TASKS", "RowError", "Task", "TaskError", "get_task", "task_from_spec"]
