"""`taskray report`: plots and report.md from a run directory, without Ray.

The fixtures are written in the exact formats the trainer and `taskray evaluate` write:
``metrics.jsonl`` rows as ``actors.train_loop`` logs them through ``MetricsSink``, the bundle's
``taskray.json`` through ``actors.bundle.write_manifest``, ``summary.json`` as
``cluster.train.run_training`` writes it, and predictions through
``cluster.evaluate.write_predictions`` with the task's own ``validate``/``decode``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.observe import MetricsSink
from cluster import report
from cluster.cli import main
from tests.conftest import keyword_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


# ----- fixtures in the trainer's formats ----------------------------------------------------
def _write_metrics(run_dir: Path, eval_metrics: list[dict[str, float]], steps_per_epoch=6):
    """Per-step and per-epoch rows as ``train_loop_per_worker`` writes them (log_every=2)."""
    sink = MetricsSink(run_dir)
    step = 0
    for epoch, task_metrics in enumerate(eval_metrics, start=1):
        for _ in range(steps_per_epoch):
            step += 1
            if step % 2 == 0:
                sink.write(
                    {
                        "epoch": epoch,
                        "step": step,
                        "loss": 1.2 / step**0.5,
                        "lr": 1e-4 * (1 - step / (steps_per_epoch * len(eval_metrics))),
                        "grad_norm": None if step == 2 else 0.8,
                        "tokens_per_s": 2000.0 + 10 * step,
                        "samples_per_s": 30.0,
                        "mfu": 0.12,
                        "peak_memory_mb": 900.0,
                    },
                    step,
                )
        record = {f"eval_{k}": v for k, v in {"loss": 0.9 / epoch, **task_metrics}.items()}
        record.update({"epoch": epoch, "step": step, "epoch_seconds": 12.5})
        sink.write(record, step, prefix="eval")


def _write_run(run_dir: Path, task, eval_metrics: list[dict[str, float]]) -> Path:
    """A finished run directory: metrics.jsonl, bundle/taskray.json, summary.json."""
    from actors.bundle import write_manifest

    run_dir.mkdir(parents=True, exist_ok=True)
    _write_metrics(run_dir, eval_metrics)
    bundle = run_dir / "bundle"
    bundle.mkdir()
    final = eval_metrics[-1]
    write_manifest(bundle, task, "tiny:bert", final, {"epoch": len(eval_metrics)})
    counts = {"read": 120, "train": 100, "validation": 18, "rejected": 2}
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "bundle": str(bundle),
                "metrics": final,
                "epoch": len(eval_metrics),
                "counts": counts,
                "seconds": {"preprocess": 3.0, "train": 40.0, "total": 43.0},
            }
        )
    )
    return run_dir


def _classification_run(tmp_path: Path, with_predictions: bool = True) -> Path:
    from cluster.evaluate import write_predictions
    from tasks import get_task

    task = get_task("classification", max_length=64, labels=["Negative", "Neutral", "Positive"])
    run = _write_run(
        tmp_path / "cls",
        task,
        [
            {"accuracy": 0.61, "macro_f1": 0.55, "count": 18.0},
            {"accuracy": 0.83, "macro_f1": 0.8123, "count": 18.0},
        ],
    )
    if with_predictions:
        rng = np.random.default_rng(0)
        golds = ["Negative", "Neutral", "Positive"] * 10
        rows = [task.validate({"text": f"review {i}", "label": g}) for i, g in enumerate(golds)]
        logits = rng.normal(size=(len(rows), 3))
        for i, g in enumerate(golds):  # mostly right, so the diagonal dominates
            logits[i, task.label2id[g]] += 2.5
        write_predictions(run / "predictions.jsonl", rows, task.decode(logits))
    return run


def _ner_run(tmp_path: Path) -> Path:
    from cluster.evaluate import write_predictions
    from tasks import get_task

    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
    task = get_task("ner", max_length=64, labels=labels)
    run = _write_run(
        tmp_path / "ner",
        task,
        [{"precision": 0.5, "recall": 0.4, "f1": 0.444, "accuracy": 0.8, "count": 18.0}],
    )
    gold_rows = [
        {"tokens": ["Tim", "Cook", "runs", "Apple", "in", "Cupertino"],
         "tags": ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC"]},
        {"tokens": ["Ada", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
        {"tokens": ["IBM", "hired", "Grace", "Hopper"], "tags": ["B-ORG", "O", "B-PER", "I-PER"]},
    ]  # fmt: skip
    predicted = [
        ["B-PER", "I-PER", "O", "B-ORG", "O", "O"],  # the location is missed
        ["B-PER", "O", "B-LOC"],
        ["B-LOC", "O", "B-PER", "I-PER"],  # IBM taken for a place
    ]
    rows = [task.validate(r) for r in gold_rows]
    outputs = []
    for tags in predicted:  # logits whose argmax at each word's first sub-token is the tag
        logits = np.full((len(tags), len(labels)), -5.0)
        for i, tag in enumerate(tags):
            logits[i, labels.index(tag)] = 5.0
        outputs.append({"logits": logits, "word_ids": list(range(len(tags)))})
    write_predictions(run / "predictions.jsonl", rows, task.decode(outputs, rows))
    return run


def _qa_run(tmp_path: Path) -> Path:
    from cluster.evaluate import write_predictions
    from tasks import get_task

    task = get_task("extractive_qa", max_length=128)
    run = _write_run(
        tmp_path / "qa",
        task,
        [{"exact_match": 0.4, "f1": 0.555, "count": 18.0}, {"exact_match": 0.6, "f1": 0.7125}],
    )
    rows, preds = [], []
    for i in range(20):
        filler = " ".join(["words"] * (5 + 8 * i))  # contexts from 8 to ~160 words
        context = f"Steve Jobs founded Apple. {filler}"
        rows.append(
            task.validate(
                {
                    "id": str(i),
                    "context": context,
                    "question": "Who founded Apple?",
                    "answers": {"text": ["Steve Jobs"], "answer_start": [0]},
                }
            )
        )
        # Short contexts answered right, long ones half right: EM falls with length.
        answer = "Steve Jobs" if i < 10 else "Jobs"
        start = context.index(answer)
        preds.append({"answer": answer, "start": start, "end": start + len(answer), "score": 0.7})
    write_predictions(run / "predictions.jsonl", rows, preds)
    return run


def _assert_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width >= min_side and height >= min_side, image.size
        assert width <= 4000 and height <= 4000, image.size
        # Not a blank canvas: a plot has more than a couple of colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 10


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "report", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def assert_one_line_error(
    code: int, stderr: str, fragment: str, stdout: str = ""
) -> None:  # fmt: skip
    assert code == 2
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("taskray: error: ")
    assert fragment in lines[0], lines[0]


# ----- the report per family ----------------------------------------------------------------
def test_classification_report_plots_curves_confusion_matrix_and_final_metrics(tmp_path):
    run = _classification_run(tmp_path)
    path = report.write_report(run)
    assert path == run / "report" / "report.md"
    for name in ("loss_lr.png", "throughput.png", "eval_metrics.png", "confusion_matrix.png"):
        _assert_png(path.parent / name)
    text = path.read_text()
    # Task, model, data sizes, final metrics of the bundle, and links to every image.
    assert "classification" in text and "`tiny:bert`" in text
    assert "120 rows read: 100 train, 18 validation, 2 rejected" in text
    assert "| accuracy | 0.83 |" in text and "| macro_f1 | 0.8123 |" in text
    assert "exported bundle (18 rows)" in text and "| count |" not in text
    for name in ("loss_lr.png", "throughput.png", "eval_metrics.png", "confusion_matrix.png"):
        assert f"]({name})" in text
    # The per-epoch table has both epochs; the confusion summary counts the 30 predictions.
    assert "| 1 | 0.9 | 0.61 | 0.55 |" in text
    assert "From 30 per-example predictions" in text
    assert "Accuracy on these 30 examples" in text


def test_nli_report_uses_the_confusion_matrix_too(tmp_path):
    from cluster.evaluate import write_predictions
    from tasks import get_task

    task = get_task("nli", max_length=64)
    run = _write_run(tmp_path / "nli", task, [{"accuracy": 0.5, "macro_f1": 0.4, "count": 6.0}])
    golds = ["entailment", "neutral", "contradiction"] * 2
    rows = [task.validate({"premise": "p", "hypothesis": "h", "label": g}) for g in golds]
    write_predictions(run / "predictions.jsonl", rows, task.decode(np.eye(3)[[0, 1, 2, 0, 0, 2]]))
    path = report.write_report(run)
    _assert_png(path.parent / "confusion_matrix.png")
    assert "gold neutral predicted as entailment (once)" in path.read_text()


def test_ner_report_draws_f1_per_entity_type(tmp_path):
    run = _ner_run(tmp_path)
    path = report.write_report(run)
    _assert_png(path.parent / "ner_entity_f1.png")
    text = path.read_text()
    assert "| f1 | 0.444 |" in text
    assert "](ner_entity_f1.png)" in text
    # seqeval per type on the fixture: PER 3/3, ORG 1 of 2 found (1 predicted), LOC 1 of 2
    # found with 1 false alarm.
    assert "- Person (PER): F1 100.0% (support 3)" in text
    assert "- Organization (ORG): F1 66.7% (support 2)" in text
    assert "- Location (LOC): F1 50.0% (support 2)" in text


def test_extractive_qa_report_draws_scores_by_context_length(tmp_path):
    run = _qa_run(tmp_path)
    path = report.write_report(run)
    _assert_png(path.parent / "qa_by_context_length.png")
    text = path.read_text()
    assert "| exact_match | 0.6 |" in text and "| f1 | 0.7125 |" in text
    assert "On these 20 questions: exact match 50.0%" in text
    # Four equal-count buckets: the shortest contexts all right, the longest all partial.
    buckets = [line for line in text.splitlines() if line.startswith("- ") and "words" in line]
    assert len(buckets) == 4
    assert "EM 100.0%" in buckets[0] and "EM 0.0%" in buckets[-1]


def test_without_predictions_the_report_says_how_to_get_the_pictures(tmp_path):
    run = _classification_run(tmp_path, with_predictions=False)
    out = tmp_path / "elsewhere"
    path = report.write_report(run, out)
    assert path == out / "report.md"
    assert not (out / "confusion_matrix.png").exists()
    _assert_png(out / "loss_lr.png")
    text = path.read_text()
    assert "No per-example predictions found" in text
    assert "--predictions" in text


def test_resumed_run_keeps_the_last_row_of_each_step_and_a_run_in_progress_is_drawn(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    rows = [
        {"epoch": 1, "step": 2, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 100.0},
        {"epoch": 1, "step": 4, "loss": 1.5, "lr": 1e-4, "tokens_per_s": 100.0},
        # Resumed from a checkpoint at step 2: step 4 is logged again.
        {"epoch": 1, "step": 4, "loss": 1.4, "lr": 1e-4, "tokens_per_s": 90.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 1, "st'  # being written
    (run / "metrics.jsonl").write_text(text)
    metrics = report.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in metrics.train] == [2, 4]
    assert metrics.train[-1]["loss"] == 1.4
    path = report.write_report(run)
    body = path.read_text()
    assert "none yet" in body and "No epoch has been evaluated yet." in body
    _assert_png(path.parent / "loss_lr.png")


# ----- the command and its errors -----------------------------------------------------------
def test_cli_report_prints_the_path_and_honours_out(tmp_path):
    run = _ner_run(tmp_path)
    done = run_cli(str(run), "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "r" / "report.md") in done.stdout
    assert (tmp_path / "r" / "ner_entity_f1.png").is_file()


def _bad_run(tmp_path: Path, content: str | None) -> Path:
    run = tmp_path / "bad"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    return run


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "metrics.jsonl not found"),
        ("", "has no training or evaluation rows"),
        ('{"step": 1, "loss": 1.0}\n{not json}\n{"step": 2, "loss": 0.9}\n', "line 2 is not valid"),
        ("[1, 2]\n", "line 1 is not a JSON object"),
        ('{"loss": 1.0}\n', "line 1: a training row without a step"),
    ],
)
def test_bad_metrics_files_are_one_line_errors(tmp_path, capsys, content, fragment):
    run = _bad_run(tmp_path, content)
    code = main(["report", str(run)])
    assert_one_line_error(code, capsys.readouterr().err, fragment)


def test_missing_run_dir_and_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert_one_line_error(
        main(["report", str(tmp_path / "nope")]), capsys.readouterr().err, "not found"
    )
    run = _classification_run(tmp_path, with_predictions=False)
    missing = tmp_path / "missing.jsonl"
    code = main(["report", str(run), "--predictions", str(missing)])
    assert_one_line_error(code, capsys.readouterr().err, "predictions file")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "no row/prediction keys"}])
    code = main(["report", str(run), "--predictions", str(wrong)])
    assert_one_line_error(code, capsys.readouterr().err, "taskray evaluate")
    (tmp_path / "afile").write_text("x")
    code = main(["report", str(run), "--out", str(tmp_path / "afile")])
    assert_one_line_error(code, capsys.readouterr().err, "not a directory")
    (run / "bundle" / "taskray.json").write_text("{broken")
    assert_one_line_error(main(["report", str(run)]), capsys.readouterr().err, "taskray.json")


def test_predictions_of_another_task_are_a_one_line_error(tmp_path, capsys):
    run = _ner_run(tmp_path)
    cls = _classification_run(tmp_path)
    code = main(["report", str(run), "--predictions", str(cls / "predictions.jsonl")])
    assert_one_line_error(code, capsys.readouterr().err, "has no 'tags'")


def test_subprocess_error_is_one_line(tmp_path):
    done = run_cli(str(tmp_path / "absent"))
    assert_one_line_error(done.returncode, done.stderr, "run directory")


# ----- taskray evaluate --predictions → taskray report --------------------------------------
def test_evaluate_writes_predictions_that_the_report_draws(tmp_path, tiny_bundle):
    data = write_jsonl(tmp_path / "held_out.jsonl", keyword_rows(24))
    run = tmp_path / "run"
    run.mkdir()
    (run / "bundle").symlink_to(tiny_bundle)
    _write_metrics(run, [{"accuracy": 0.5, "macro_f1": 0.4, "count": 24.0}])
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "evaluate", str(tiny_bundle), "--data", str(data),
         "--predictions", str(run / "predictions.jsonl"), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predictions"] == str(run / "predictions.jsonl")
    lines = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    assert set(lines[0]) == {"row", "prediction"}
    assert lines[0]["row"]["label"] in ("Negative", "Positive")
    assert lines[0]["prediction"]["label"] in ("Negative", "Positive")
    path = report.write_report(run)
    _assert_png(path.parent / "confusion_matrix.png")
    assert "From 24 per-example predictions" in path.read_text()


def test_report_has_help():
    done = run_cli("--help")
    assert done.returncode == 0
    assert "usage: taskray report" in done.stdout and "--predictions" in done.stdout


def test_drawing_again_without_predictions_removes_the_old_picture(tmp_path):
    run = _classification_run(tmp_path)
    out = report.write_report(run).parent
    assert (out / "confusion_matrix.png").is_file()
    (run / "predictions.jsonl").unlink()
    report.write_report(run)
    assert not (out / "confusion_matrix.png").exists()
    assert (out / "loss_lr.png").is_file()
