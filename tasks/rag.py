"""RAG: the prompt builder (retrieved passages with ids + question, within a token budget, asking
for cited answers) and the RAG fine-tuning formulation (gold passages mixed with distractors)."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tasks.base import RowError, Task
from tasks.lm import encode_prompt_completion, with_bos_text
from tasks.metrics import retrieval_scores, squad_scores

INSTRUCTION = (
    "Answer the question using only the passages below. Cite the passage ids you used in "
    "square brackets, like [doc-1]. If the passages do not contain the answer, say you don't know."
)
_CITATION = re.compile(r"\[([^\[\]\s]{1,128})\]")


class Passage(BaseModel):
    """A retrieved or gold passage."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    title: str | None = None
    score: float | None = None


class RagRow(BaseModel):
    """A question with its answer, gold passages and optional distractors."""

    model_config = ConfigDict(strict=True, extra="ignore")

    question: str = Field(min_length=1)
    answer: str | None = None
    passages: list[Passage] = Field(default_factory=list)
    distractors: list[Passage] = Field(default_factory=list)


class RagOptions(BaseModel):
    """Prompt budget and citation style."""

    model_config = ConfigDict(extra="forbid")

    passage_budget: int = Field(
        default=384, ge=16, description="max tokens of passages in the prompt (whole passages)"
    )
    cite: bool = Field(default=True, description="train answers that end with [passage-id]")
    shuffle_seed: int = 0


def format_passage(passage: dict[str, Any]) -> str:
    """One passage as the prompt shows it."""
    title = f" {passage['title']}:" if passage.get("title") else ""
    return f"[{passage['id']}]{title} {passage['text']}"


def build_prompt(
    question: str,
    passages: Sequence[dict[str, Any]],
    budget: int,
    count_tokens: Any = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The generator prompt and the passages that fit ``budget`` tokens, in rank order.

    Passages are taken whole (a cut passage could lose the sentence that answers), best first,
    until the next would exceed the budget. ``count_tokens`` defaults to whitespace words.
    """
    count = count_tokens or (lambda text: len(text.split()))
    used: list[dict[str, Any]] = []
    total = 0
    for passage in passages:
        cost = count(format_passage(passage))
        if total + cost > budget:
            continue
        used.append(passage)
        total += cost
    context = "\n".join(format_passage(p) for p in used)
    return f"{INSTRUCTION}\n\nPassages:\n{context}\n\nQuestion: {question}\nAnswer:", used


def extract_citations(text: str) -> tuple[str, list[str]]:
    """Split a generated answer into its text and the cited ids (in order, unique)."""
    cited: list[str] = []
    for cid in _CITATION.findall(text):
        if cid not in cited:
            cited.append(cid)
    return _CITATION.sub("", text).strip(), cited


class RagTask(Task):
    """Retrieval-augmented answering; trains the generator to answer from cited passages."""

    name: ClassVar[str] = "rag"
    description: ClassVar[str] = (
        "question → retrieve → answer with citations (EM/F1, recall@k, MRR)"
    )
    formulations: ClassVar[dict[str, str]] = {"causal": "causal_lm"}
    row_schema: ClassVar[type[RagRow]] = RagRow
    options_schema: ClassVar[type[BaseModel] | None] = RagOptions

    def context_passages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Gold and distractor passages in a seeded order that depends on the question, so the
        gold one is not always first."""
        passages = list(row.get("passages", [])) + list(row.get("distractors", []))
        digest = hashlib.sha256(f"{self.options.shuffle_seed}:{row['question']}".encode())
        random.Random(int.from_bytes(digest.digest()[:8], "big")).shuffle(passages)
        return passages

    def target(self, row: dict[str, Any], shown: Sequence[dict[str, Any]]) -> str:
        """The answer, citing the gold passages that made it into the prompt."""
        if "answer" not in row:
            raise RowError("answer", "missing field (needed to train or evaluate)")
        gold = {p["id"] for p in row.get("passages", [])}
        cites = "".join(f" [{p['id']}]" for p in shown if p["id"] in gold)
        return f" {row['answer']}{cites if self.options.cite else ''}"

    def encode_row(self, row: dict[str, Any], tokenizer: Any) -> dict[str, list[int]]:
        if not row.get("passages"):
            raise RowError("passages", "training rows need at least one gold passage")

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        prompt, shown = build_prompt(
            row["question"], self.context_passages(row), self.options.passage_budget, count
        )
        if not any(p["id"] in {g["id"] for g in row["passages"]} for p in shown):
            raise RowError(
                "passages",
                f"no gold passage fits passage_budget={self.options.passage_budget} tokens",
            )
        return encode_prompt_completion(
            tokenizer, prompt, self.target(row, shown), self.max_length, "answer"
        )

    def generation_prompt(self, row: dict[str, Any], tokenizer: Any = None) -> str:
        """The prompt over the row's passages (gold + distractors) within the budget (with the
        BOS text in front when training puts ``[BOS]`` there)."""

        def count(text: str) -> int:
            if tokenizer is None:
                return len(text.split())
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        prompt, _ = build_prompt(
            row["question"], self.context_passages(row), self.options.passage_budget, count
        )
        return with_bos_text(tokenizer, prompt)

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated text → ``{"answer", "citations"}``."""
        out = []
        for text in outputs:
            answer, cited = extract_citations(str(text))
            out.append({"answer": answer, "citations": cited})
        return out

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        """Answer EM/F1; with ``retrieved`` ids in predictions, recall@k and MRR against the
        gold passage ids."""
        out = squad_scores([p["answer"] for p in predictions], [[r["answer"]] for r in rows])
        if predictions and all("retrieved" in p for p in predictions):
            k = max(len(p["retrieved"]) for p in predictions)
            out.update(
                retrieval_scores(
                    [p["retrieved"] for p in predictions],
                    [[g["id"] for g in r.get("passages", [])] for r in rows],
                    k=k,
                )
            )
        return out
