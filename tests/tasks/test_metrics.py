"""Metrics against the reference libraries and hand-computed values; the code sandbox."""

from __future__ import annotations

import itertools
import os

import pytest

from tasks import get_task
from tasks.code import run_tests
from tasks.metrics import (
    answers_equal,
    bleu_chrf,
    normalize_answer,
    pass_at_k,
    retrieval_scores,
    rouge_scores,
    squad_scores,
)

PREDS = ["the cat sat on the mat", "a quick brown dog jumps", "hello world"]
REFS = ["the cat is on the mat", "the quick brown fox jumps over", "hello there world"]


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    ours = rouge_scores(PREDS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        ref = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS, strict=True)) / 3
        assert ours[key] == pytest.approx(ref)


def test_bleu_chrf_equal_sacrebleu():
    import sacrebleu

    ours = bleu_chrf(PREDS, REFS)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score / 100)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score / 100)
    assert bleu_chrf(REFS, REFS)["bleu"] == pytest.approx(1.0)


def test_squad_normalisation_and_scores_by_hand():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    scores = squad_scores(["The Eiffel Tower!", "in Paris France"], [["eiffel tower"], ["Paris"]])
    # EM: 1 and 0; F1: 1 and 2·(1/3·1)/(1/3+1) = 0.5
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.75)
    assert squad_scores(["Jobs"], [["Steve Jobs", "Jobs"]])["exact_match"] == 1.0
    assert squad_scores([""], [[""]])["f1"] == 1.0


def test_final_answer_comparison():
    assert answers_equal("1,250", "1250")
    assert answers_equal("$3.50", "3.5")
    assert not answers_equal("12", "13")
    assert answers_equal("The Blue one", "blue one")


def test_retrieval_scores_by_hand():
    scores = retrieval_scores([["a", "b", "c"], ["x", "y", "z"]], [["b"], ["q"]], k=2)
    assert scores == {"recall@2": 0.5, "mrr": pytest.approx(0.25)}


def test_pass_at_k_matches_combinatorial_definition():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (10, 0, 2), (4, 4, 2), (7, 3, 5)]:
        combos = list(itertools.combinations(range(n), k))
        exact = sum(any(i < c for i in combo) for combo in combos) / len(combos)
        assert pass_at_k(n, c, k) == pytest.approx(exact)


def test_sandbox_runs_passes_fails_and_limits(tmp_path):
    good = "def add(a, b):\n    return a + b\n"
    assert run_tests(good, ["assert add(2, 3) == 5"])
    assert not run_tests(good, ["assert add(2, 3) == 6"])
    assert not run_tests("def add(a, b) return", ["assert True"])
    assert not run_tests("while True:\n    pass\n", [], timeout_s=1.0)
    network = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    assert not run_tests(network, [])
    before = set(os.listdir(tmp_path))
    writes = (
        "open('left-behind.txt', 'w').write('x')\n"
        "import os\nassert os.path.exists('left-behind.txt')\n"
    )
    assert run_tests(writes, [])
    assert set(os.listdir(tmp_path)) == before
    assert not os.path.exists("left-behind.txt")


def test_code_metrics_exact_match_and_pass_at_k():
    task = get_task("code")
    rows = [{"prompt": "p", "code": "def f():\n    return 1\n", "tests": ["assert f() == 1"]}]
    right = task.decode(["```python\ndef f():\n    return 1\n```"])
    assert right[0]["code"] == "def f():\n    return 1"
    assert task.metrics(right, rows) == {"exact_match": 1.0, "pass@1": 1.0}
    samples = [{"code": "x", "samples": ["def f():\n    return 2", "def f():\n    return 1"]}]
    m = task.metrics(samples, rows)
    assert m["pass@1"] == pytest.approx(0.5) and m["pass@2"] == 1.0
