"""`taskray report RUN_DIR`: pictures and a one-page summary of a training run.

Reads what a run already leaves behind — ``metrics.jsonl`` (written by the training loop's
``MetricsSink``: one row per logged step with ``loss``/``lr``/``tokens_per_s``/…, and one row
per epoch with the ``eval_*`` metrics), the bundle's ``taskray.json`` and the driver's
``summary.json`` — and, when present, a per-example predictions file written by
``taskray evaluate BUNDLE --data FILE --predictions FILE``. It writes PNG plots (matplotlib,
Agg canvas, no display needed) and ``report.md`` linking them.

Nothing here imports Ray or torch: a report can be drawn on a laptop from a run directory
copied off a cluster.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import UserError

METRICS_FILE = "metrics.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"

#: Families whose per-example predictions get a picture, and the file each one writes.
CLASSIFICATION_FAMILIES = ("classification", "nli")
PICTURE_FILES = {
    "classification": "confusion_matrix.png",
    "nli": "confusion_matrix.png",
    "ner": "ner_entity_f1.png",
    "extractive_qa": "qa_by_context_length.png",
}

#: The plots every report draws (when their rows exist).
PLOT_FILES = ("loss_lr.png", "throughput.png", "eval_metrics.png")

#: Keys of an evaluation row that are bookkeeping, not metrics worth a curve.
_EVAL_SKIP = ("eval_count",)


class ReportError(UserError):
    """A run directory or file the report cannot read (printed as one ``taskray: error:``)."""


# ----- reading ------------------------------------------------------------------------------
@dataclass
class RunMetrics:
    """The rows of ``metrics.jsonl``, split by kind.

    ``train`` holds the per-step rows sorted by step and ``evals`` the per-epoch rows sorted
    by epoch. A resumed run appends to the same file and logs again the steps it redoes after
    its checkpoint, so a later row for the same step (or epoch) replaces the earlier one.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eval_metrics(self) -> list[str]:
        """The ``eval_*`` metric names seen in any evaluation row, in first-seen order."""
        names: dict[str, None] = {}
        for row in self.evals:
            for key, value in row.items():
                if key.startswith("eval_") and key not in _EVAL_SKIP and _is_number(value):
                    names.setdefault(key, None)
        return list(names)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse a run's ``metrics.jsonl``; a missing, empty or malformed file is a ``ReportError``.

    A last line without its newline that does not parse is skipped: that is a row the training
    loop is writing right now, and a report of a run in progress should still be drawn.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path} not found (is this a taskray run directory?)")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                continue
            raise ReportError(f"{path} line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path} line {number} is not a JSON object")
        step = row.get("step")
        if any(k.startswith("eval_") for k in row):
            epoch = row.get("epoch")
            if not isinstance(epoch, int):
                raise ReportError(f"{path} line {number}: an evaluation row without an epoch")
            evals[epoch] = row
        elif "loss" in row:
            if not isinstance(step, int):
                raise ReportError(f"{path} line {number}: a training row without a step")
            train[step] = row
        # Other rows (none are written today) are left alone rather than refused, so a newer
        # trainer's extra records do not break reports.
    if not train and not evals:
        raise ReportError(f"{path} has no training or evaluation rows (empty or still starting)")
    return RunMetrics(
        train=[train[s] for s in sorted(train)], evals=[evals[e] for e in sorted(evals)]
    )


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a predictions file: JSON objects ``{"row": {...}, "prediction": {...}}``."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"predictions file {path} not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path} line {number} is not valid JSON ({err.msg})") from None
        if not (
            isinstance(item, dict)
            and isinstance(item.get("row"), dict)
            and isinstance(item.get("prediction"), dict)
        ):
            raise ReportError(
                f"{path} line {number} is not a {{'row': ..., 'prediction': ...}} object "
                "(write the file with `taskray evaluate ... --predictions FILE`)"
            )
        out.append(item)
    if not out:
        raise ReportError(f"predictions file {path} is empty")
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or ``None`` when absent; unreadable is a ``ReportError``."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a JSON object")
    return data


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The bundle's manifest, or ``None`` while the run has not exported one yet."""
    # actors.manifest, not actors.bundle: the latter imports torch, seconds of start-up for
    # one JSON file.
    from actors.manifest import MANIFEST, read_manifest

    if not (run_dir / "bundle" / MANIFEST).is_file():
        return None
    return read_manifest(run_dir / "bundle")  # BundleError (one line, exit 2) when malformed


# ----- plots --------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    # A bare Figure renders through the Agg canvas without pyplot: no global state, no GUI
    # backend lookup, safe on a headless cluster node and inside a long-lived process.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the rows where both keys hold finite numbers (grad_norm may be null)."""
    pairs = [(r[x], r[y]) for r in rows if _is_number(r.get(x)) and _is_number(r.get(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_loss_lr(metrics: RunMetrics, path: Path) -> Path:
    """Training loss (with the validation loss at each epoch's step) and learning rate."""
    fig = _figure(8, 6)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    steps, loss = _series(metrics.train, "step", "loss")
    ax_loss.plot(steps, loss, marker="." if len(steps) < 30 else None, label="train loss")
    eval_steps, eval_loss = _series(metrics.evals, "step", "eval_loss")
    if eval_steps:
        ax_loss.plot(eval_steps, eval_loss, "o--", label="validation loss (end of epoch)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    steps, lr = _series(metrics.train, "step", "lr")
    ax_lr.plot(steps, lr, color="tab:green")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    return _save(fig, path)


def plot_throughput(metrics: RunMetrics, path: Path) -> Path:
    """Tokens per second (cluster-wide, as logged) against step."""
    fig = _figure(8, 4)
    ax = fig.subplots()
    steps, tok_s = _series(metrics.train, "step", "tokens_per_s")
    ax.plot(steps, tok_s, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens / s (all workers)")
    ax.set_title("Training throughput")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_eval_metrics(metrics: RunMetrics, path: Path) -> Path:
    """One small panel per evaluation metric against epoch."""
    names = metrics.eval_metrics
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(4 * cols, 3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        epochs, values = _series(metrics.evals, "epoch", name)
        ax.plot(epochs, values, "o-")
        ax.set_title(name.removeprefix("eval_"))
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.suptitle("Validation metrics per epoch")
    return _save(fig, path)


def plot_confusion(
    gold: Sequence[str], pred: Sequence[str], labels: Sequence[str], path: Path
) -> Path:
    """Confusion matrix (rows: gold, columns: predicted), coloured by each gold row's share so
    a rare class's errors show as clearly as a common one's; cells print the counts."""
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    for g, p in zip(gold, pred, strict=True):
        counts[index[g], index[p]] += 1
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.6 * len(labels) + 2.5)
    fig = _figure(side + 1, side)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the gold class")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour)
    ax.set_title(f"Confusion matrix ({len(gold)} examples)")
    return _save(fig, path)


def plot_bars(
    names: Sequence[str],
    series: dict[str, Sequence[float]],
    notes: Sequence[str],
    title: str,
    xlabel: str,
    path: Path,
) -> Path:
    """Horizontal grouped bars (percent, 0–100) with a note (e.g. the support) per group."""
    import numpy as np

    height = 0.8 / max(len(series), 1)
    fig = _figure(8, max(3.0, 0.5 * len(names) * max(len(series), 1) + 1.5))
    ax = fig.subplots()
    ys = np.arange(len(names))
    for k, (label, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * height
        bars = ax.barh(ys + offset, values, height=height, label=label)
        ax.bar_label(bars, fmt="%.1f", padding=2)
    ax.set_yticks(ys, [f"{n}\n{note}" for n, note in zip(names, notes, strict=True)])
    ax.invert_yaxis()  # first group on top, as it reads in the table
    ax.set_xlim(0, 115)  # room for the value printed after a full bar
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if len(series) > 1:  # below the axes: inside, it would cover the longest bars' values
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(series))
    return _save(fig, path)


# ----- task pictures ------------------------------------------------------------------------
def _field(item: dict[str, Any], where: str, key: str, path: Path, number: int) -> Any:
    value = item[where].get(key)
    if value is None:
        raise ReportError(
            f"{path} row {number}: {where} has no '{key}' (predictions of another task?)"
        )
    return value


def classification_picture(
    items: Sequence[dict[str, Any]], labels: Sequence[str] | None, out: Path, source: Path
) -> tuple[Path, list[str]]:
    """Confusion matrix of classification/NLI predictions; returns the file and summary lines."""
    gold = [str(_field(it, "row", "label", source, n)) for n, it in enumerate(items, 1)]
    pred = [str(_field(it, "prediction", "label", source, n)) for n, it in enumerate(items, 1)]
    # The manifest's label order (class ids) first; labels only the data uses come after.
    order = list(labels or [])
    order += sorted({*gold, *pred} - set(order))
    path = plot_confusion(gold, pred, order, out / PICTURE_FILES["classification"])
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    lines = [f"- Accuracy on these {len(gold)} examples: {correct / len(gold):.4f}."]
    confused = [
        (sum(1 for g, p in zip(gold, pred, strict=True) if (g, p) == (a, b)), a, b)
        for a in order
        for b in order
        if a != b
    ]
    worst = max(confused, default=(0, "", ""))
    if worst[0]:
        times = "once" if worst[0] == 1 else f"{worst[0]} times"
        lines.append(
            f"- Most frequent confusion: gold {worst[1]} predicted as {worst[2]} ({times})."
        )
    return path, lines


def ner_picture(items: Sequence[dict[str, Any]], out: Path, source: Path) -> tuple[Path, list[str]]:
    """Per-entity-type precision/recall/F1 (seqeval, as the task's metric) of NER predictions."""
    from seqeval.metrics import classification_report

    from tasks.ner import entity_name

    gold = [list(_field(it, "row", "tags", source, n)) for n, it in enumerate(items, 1)]
    pred = [list(_field(it, "prediction", "tags", source, n)) for n, it in enumerate(items, 1)]
    for n, (g, p) in enumerate(zip(gold, pred, strict=True), start=1):
        if len(g) != len(p):
            raise ReportError(f"{source} row {n}: {len(p)} predicted tags for {len(g)} gold tags")
    table = classification_report(gold, pred, output_dict=True, zero_division=0)
    types = sorted(k for k in table if not k.endswith(" avg"))
    if not types:
        raise ReportError(f"{source}: no entities in the gold or predicted tags to score")
    names = [f"{entity_name(t)} ({t})" if entity_name(t) != t else t for t in types]
    path = plot_bars(
        names,
        {
            "F1": [100 * table[t]["f1-score"] for t in types],
            "precision": [100 * table[t]["precision"] for t in types],
            "recall": [100 * table[t]["recall"] for t in types],
        },
        [f"n={int(table[t]['support'])}" for t in types],
        f"Entity F1 by type ({len(items)} sentences, seqeval)",
        "percent",
        out / PICTURE_FILES["ner"],
    )
    micro = table.get("micro avg", {}).get("f1-score", 0.0)
    lines = [f"Entity F1 (micro) on these {len(items)} sentences: {100 * micro:.1f}%.", ""]
    lines += [
        f"- {name}: F1 {100 * table[t]['f1-score']:.1f}% (support {int(table[t]['support'])})"
        for name, t in zip(names, types, strict=True)
    ]
    return path, lines


def context_buckets(lengths: Sequence[int], most: int = 4) -> list[tuple[int, int]]:
    """Up to ``most`` inclusive ``(low, high)`` length ranges holding about equal numbers of
    examples (quantile edges), with at least ~5 examples per bucket so a bar means something."""
    import numpy as np

    count = max(1, min(most, len(lengths) // 5))
    edges = np.unique(np.quantile(np.asarray(lengths), np.linspace(0, 1, count + 1)).round())
    edges = [int(e) for e in edges]
    if len(edges) == 1:
        return [(edges[0], edges[0])]
    buckets = [(edges[0], edges[1])]
    buckets += [(lo + 1, hi) for lo, hi in itertools.pairwise(edges[1:])]
    return buckets


def qa_picture(items: Sequence[dict[str, Any]], out: Path, source: Path) -> tuple[Path, list[str]]:
    """SQuAD exact match and F1 (per example as the task scores them, shown in percent) by
    context length in words, in buckets of about equal size."""
    from tasks.metrics import exact_match, token_f1

    scored = []
    for n, it in enumerate(items, start=1):
        context = str(_field(it, "row", "context", source, n))
        answer = it["prediction"].get("answer")
        if answer is None:
            raise ReportError(f"{source} row {n}: prediction has no 'answer'")
        golds = list((it["row"].get("answers") or {}).get("text") or []) or [""]
        em = max(exact_match(str(answer), g) for g in golds)
        f1 = max(token_f1(str(answer), g) for g in golds)
        scored.append((len(context.split()), em, f1))
    buckets = context_buckets([s[0] for s in scored])
    names, ems, f1s, notes = [], [], [], []
    for lo, hi in buckets:
        inside = [s for s in scored if lo <= s[0] <= hi]
        if not inside:
            continue
        names.append(f"{lo}–{hi} words" if lo != hi else f"{lo} words")
        ems.append(100 * sum(s[1] for s in inside) / len(inside))
        f1s.append(100 * sum(s[2] for s in inside) / len(inside))
        notes.append(f"n={len(inside)}")
    path = plot_bars(
        names,
        {"exact match": ems, "F1": f1s},
        notes,
        f"Extractive QA by context length ({len(items)} questions)",
        "percent",
        out / PICTURE_FILES["extractive_qa"],
    )
    total_em = 100 * sum(s[1] for s in scored) / len(scored)
    total_f1 = 100 * sum(s[2] for s in scored) / len(scored)
    lines = [
        f"On these {len(scored)} questions: exact match {total_em:.1f}%, F1 {total_f1:.1f}%.",
        "",
        *(
            f"- {name} ({note}): EM {em:.1f}%, F1 {f1:.1f}%"
            for name, note, em, f1 in zip(names, notes, ems, f1s, strict=True)
        ),
    ]
    return path, lines


# ----- the report ---------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _overview(
    run_dir: Path,
    manifest: dict[str, Any] | None,
    summary: dict[str, Any] | None,
    config: dict[str, Any] | None,
    metrics: RunMetrics,
) -> list[str]:
    task = (manifest or {}).get("task") or (config or {}).get("task") or {}
    rows: list[tuple[str, str]] = []
    if task:
        kind = (manifest or {}).get("model_kind")
        detail = ", ".join(x for x in (task.get("formulation"), kind) if x)
        rows.append(("task", f"{task.get('name', '?')}" + (f" ({detail})" if detail else "")))
    labels = (manifest or {}).get("label_names") or task.get("labels")
    if labels:
        shown = ", ".join(map(str, labels[:20])) + (" …" if len(labels) > 20 else "")
        rows.append(("labels", f"{len(labels)}: {shown}"))
    model = (manifest or {}).get("base_model") or ((config or {}).get("model") or {}).get(
        "name_or_path"
    )
    if model:
        extra = " (LoRA adapter)" if (manifest or {}).get("adapter") else ""
        rows.append(("model", f"`{model}`{extra}"))
    max_length = (manifest or {}).get("max_length") or task.get("max_length")
    if max_length:
        rows.append(("max length", f"{max_length} tokens"))
    counts = (summary or {}).get("counts") or {}
    if counts:
        parts = [f"{counts[k]} {k}" for k in ("train", "validation", "rejected") if k in counts]
        read = f"{counts['read']} rows read: " if "read" in counts else ""
        rows.append(("data", read + ", ".join(parts)))
    else:
        rows.append(("data", f"sizes unknown (no {SUMMARY_FILE}: the run has not finished)"))
    if metrics.train or metrics.evals:
        last_step = max([r["step"] for r in metrics.train] + [0])
        seconds = sum(
            r["epoch_seconds"] for r in metrics.evals if _is_number(r.get("epoch_seconds"))
        )
        text = f"{len(metrics.evals)} epoch(s) evaluated, {last_step} optimizer steps logged"
        rows.append(("training", text + (f", {seconds:.1f} s" if seconds else "")))
    if manifest is not None:
        chosen = manifest.get("epoch")
        rows.append(
            ("bundle", f"`{run_dir / 'bundle'}`" + (f" (epoch {chosen})" if chosen else ""))
        )
    else:
        rows.append(("bundle", "none yet (the run has not exported one)"))
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def write_report(
    run_dir: str | Path, out: str | Path | None = None, predictions: str | Path | None = None
) -> Path:
    """Draw a run's plots and write ``report.md`` into ``out`` (default ``RUN_DIR/report``).

    ``predictions`` is a file from ``taskray evaluate ... --predictions FILE``; by default
    ``RUN_DIR/predictions.jsonl`` is used when it exists. Without one, the task pictures are
    left out and the report says how to get them. Returns the path of ``report.md``.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("taskray report needs matplotlib (pip install matplotlib)") from None
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} not found")
    metrics = read_metrics(run_dir / METRICS_FILE)
    manifest = _read_manifest(run_dir)
    summary = _read_json(run_dir / SUMMARY_FILE)
    config = _read_json(run_dir / "config.json")
    out = Path(out) if out is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a directory")
    items, source = None, None
    if predictions is not None:
        source = Path(predictions)
        items = read_predictions(source)
    elif (run_dir / PREDICTIONS_FILE).is_file():
        source = run_dir / PREDICTIONS_FILE
        items = read_predictions(source)
    out.mkdir(parents=True, exist_ok=True)
    # A report drawn again must not keep pictures whose data is gone (e.g. predictions removed):
    # report.md would not link them, but a person browsing the folder would still see them.
    for stale in {*PLOT_FILES, *PICTURE_FILES.values()}:
        (out / stale).unlink(missing_ok=True)

    md = [f"# taskray report: `{run_dir.resolve().name}`", ""]
    md += _overview(run_dir, manifest, summary, config, metrics)
    final = {k: v for k, v in ((manifest or {}).get("metrics") or {}).items() if _is_number(v)}
    if not final and metrics.evals:  # no bundle yet: the last evaluation is the latest word
        last = metrics.evals[-1]
        final = {k[5:]: v for k, v in last.items() if k.startswith("eval_") and _is_number(v)}
    md += ["", "## Final metrics", ""]
    if final:
        where = "the exported bundle" if manifest and manifest.get("metrics") else "the last epoch"
        count = final.pop("count", None)  # bookkeeping, said in words rather than as a metric
        rows = f" ({int(count)} rows)" if count else ""
        md += [f"Validation metrics of {where}{rows}:", ""]
        md += _table(["metric", "value"], sorted(final.items()))
    else:
        md.append("No evaluation has finished yet.")

    md += ["", "## Training", ""]
    if metrics.train:
        plot_loss_lr(metrics, out / "loss_lr.png")
        plot_throughput(metrics, out / "throughput.png")
        last = metrics.train[-1]
        tok = sorted(r["tokens_per_s"] for r in metrics.train if _is_number(r.get("tokens_per_s")))
        md.append(
            f"Last logged train loss {_fmt(last['loss'])} at step {last['step']}"
            + (f"; median {tok[len(tok) // 2]:,.0f} tokens/s" if tok else "")
            + "."
        )
        md += ["", "![Loss and learning rate against step](loss_lr.png)", ""]
        md += ["![Tokens per second against step](throughput.png)"]
    else:
        md.append(f"No per-step rows in {METRICS_FILE} (nothing logged yet).")

    md += ["", "## Validation per epoch", ""]
    names = metrics.eval_metrics
    if names:
        plot_eval_metrics(metrics, out / "eval_metrics.png")
        md += _table(
            ["epoch", *(n.removeprefix("eval_") for n in names)],
            [[r["epoch"], *(r.get(n, "") for n in names)] for r in metrics.evals],
        )
        md += ["", "![Validation metrics per epoch](eval_metrics.png)"]
    else:
        md.append("No epoch has been evaluated yet.")

    md += ["", "## Task pictures", ""]
    md += _task_section(run_dir, manifest, config, items, source, out)
    path = out / REPORT_FILE
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


def _task_section(
    run_dir: Path,
    manifest: dict[str, Any] | None,
    config: dict[str, Any] | None,
    items: list[dict[str, Any]] | None,
    source: Path | None,
    out: Path,
) -> list[str]:
    task = (manifest or {}).get("task") or (config or {}).get("task") or {}
    family = task.get("name")
    if family not in PICTURE_FILES:
        return [f"No task-specific picture for the {family or 'unknown'} family."]
    if items is None or source is None:
        bundle = run_dir / "bundle"
        name = _picture_name(family)
        return [
            f"No per-example predictions found (no {run_dir / PREDICTIONS_FILE}), so the "
            f"{name[0].lower() + name[1:]} is not drawn. Write them with "
            f"`taskray evaluate {bundle} --data HELD_OUT.jsonl "
            f"--predictions {run_dir / PREDICTIONS_FILE}` and run `taskray report {run_dir}` "
            "again."
        ]
    if family in CLASSIFICATION_FAMILIES:
        labels = (manifest or {}).get("label_names") or task.get("labels")
        path, lines = classification_picture(items, labels, out, source)
    elif family == "ner":
        path, lines = ner_picture(items, out, source)
    else:
        path, lines = qa_picture(items, out, source)
    return [
        f"From {len(items)} per-example predictions in `{source}`.",
        "",
        f"![{_picture_name(family)}]({path.name})",
        "",
        *lines,
    ]


def _picture_name(family: str) -> str:
    return {
        "ner": "F1 per entity type",
        "extractive_qa": "Exact match and F1 by context length",
    }.get(family, "Confusion matrix")


# ----- CLI ----------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's plots and ``report.md``; print where."""
    path = write_report(args.run_dir, args.out, args.predictions)
    pictures = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"[taskray] report: {path} ({len(pictures)} plots: {', '.join(pictures)})")
    return 0


def register(sub: Any) -> None:
    """Add the ``report`` command to the CLI's subparsers."""
    p = sub.add_parser(
        "report",
        help="plots and a one-page summary of a training run",
        description="From RUN_DIR/metrics.jsonl and the bundle's taskray.json: PNG plots of "
        "loss and learning rate, tokens/s and each validation metric per epoch, and "
        "report.md. With per-example predictions (RUN_DIR/predictions.jsonl, written by "
        "`taskray evaluate BUNDLE --data FILE --predictions FILE`) also a confusion matrix "
        "(classification, NLI), per-entity-type F1 (NER) or EM/F1 by context length "
        "(extractive QA).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (taskray train --output)")
    p.add_argument("--out", help="folder for report.md and the PNGs (default: RUN_DIR/report)")
    p.add_argument(
        "--predictions",
        help="per-example predictions JSONL (default: RUN_DIR/predictions.jsonl if present)",
    )
    p.set_defaults(func=cmd_report)
