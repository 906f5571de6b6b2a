"""The standard metrics of each family, computed with the field's reference libraries.

SQuAD EM/F1 are written out here because the official evaluation script is not a package; the
normalisation below is the script's own (lower-case, strip punctuation, drop a/an/the, squash
whitespace). ROUGE comes from rouge-score, BLEU/chrF from sacrebleu, entity F1 from seqeval.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1/v2.0 answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD token-overlap F1 (an empty answer only matches an empty answer)."""
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    if not pred_tokens or not truth_tokens:
        return float(pred_tokens == truth_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 on the 0–1 scale of every taskray metric (the official SQuAD script
    reports ×100), max over gold answers."""
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for pred, golds in zip(predictions, truths, strict=True):
        golds = list(golds) or [""]
        em += max(exact_match(pred, g) for g in golds)
        f1 += max(token_f1(pred, g) for g in golds)
    n = len(predictions)
    return {"exact_match": em / n, "f1": f1 / n}


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, float]:
    """Mean ROUGE F-measures (0–1, as rouge-score gives them) with Porter stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: v / n for t, v in totals.items()}


def bleu_chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus sacreBLEU and chrF (sacrebleu's defaults), one reference per prediction, on the
    0–1 scale of every taskray metric (sacrebleu reports 0–100)."""
    import sacrebleu

    refs = [list(references)]
    return {
        "bleu": float(sacrebleu.corpus_bleu(list(predictions), refs).score) / 100.0,
        "chrf": float(sacrebleu.corpus_chrf(list(predictions), refs).score) / 100.0,
    }


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision/recall/F1 (seqeval, default CoNLL mode) and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    gold_l, pred_l = [list(g) for g in gold], [list(p) for p in pred]
    return {
        "precision": float(precision_score(gold_l, pred_l, zero_division=0)),
        "recall": float(recall_score(gold_l, pred_l, zero_division=0)),
        "f1": float(f1_score(gold_l, pred_l, zero_division=0)),
        "accuracy": float(accuracy_score(gold_l, pred_l)),
    }


_NUMBER = re.compile(r"^[-+]?[$€£]?\s*(\d{1,3}(,\d{3})+|\d+)(\.\d+)?\s*%?$")


def parse_number(text: str) -> float | None:
    """A number written as an answer ("1,234", "$5", "12.50", "40%"), or None."""
    t = text.strip().rstrip(".")
    if not _NUMBER.match(t):
        return None
    try:
        return float(re.sub(r"[,$€£%\s]", "", t))
    except ValueError:
        return None


def answers_equal(prediction: str, truth: str) -> bool:
    """Final answers agree: as numbers when both are numbers, else after normalisation."""
    a, b = parse_number(prediction), parse_number(truth)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return normalize_answer(prediction) == normalize_answer(truth)


def retrieval_scores(
    retrieved: Sequence[Sequence[str]], relevant: Sequence[Sequence[str]], k: int
) -> dict[str, float]:
    """recall@k (share of relevant ids found in the top k) and MRR over the full ranking."""
    if not retrieved:
        return {f"recall@{k}": 0.0, "mrr": 0.0}
    recall = rr = 0.0
    for ranked, gold in zip(retrieved, relevant, strict=True):
        gold_set = set(gold)
        if gold_set:
            recall += len(gold_set & set(ranked[:k])) / len(gold_set)
        rank = next((i + 1 for i, r in enumerate(ranked) if r in gold_set), None)
        rr += 1.0 / rank if rank else 0.0
    n = len(retrieved)
    return {f"recall@{k}": recall / n, "mrr": rr / n}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al., 2021) from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
