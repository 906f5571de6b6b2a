"""The taskray command line as a user runs it: one-line errors, non-zero exits, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import keyword_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def taskray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=300,
        check=False,
    )


def assert_one_line_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskray: error: ")
    assert fragment in lines[0]


def _config(tmp_path: Path, tiny_bert: Path, **changes) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", keyword_rows(20))
    data = yaml.safe_load((ROOT / "configs" / "classification-minilm.yaml").read_text())
    data["model"] = {"name_or_path": str(tiny_bert), "init": "random"}
    data["data"]["train"] = str(train)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: [classification\n")
    assert_one_line_error(taskray("train", str(bad)), "invalid YAML")


def test_missing_config_file(tmp_path):
    assert_one_line_error(taskray("train", str(tmp_path / "nope.yaml")), "config file not found")


def test_unknown_task(tmp_path, tiny_bert):
    cfg = _config(tmp_path, tiny_bert, task__name="sentiment-magic")
    assert_one_line_error(taskray("train", str(cfg)), "unknown task 'sentiment-magic'")


def test_missing_data_file(tmp_path, tiny_bert):
    cfg = _config(tmp_path, tiny_bert)
    done = taskray("train", str(cfg), "--train", str(tmp_path / "missing.jsonl"))
    assert_one_line_error(done, "train data not found")


def test_unknown_setting_and_bad_override(tmp_path, tiny_bert):
    from concurrent.futures import ThreadPoolExecutor

    cfg = str(_config(tmp_path, tiny_bert))
    cases = [
        (("training.epocs=3",), "training.epocs"),
        (("training.epochs=zero",), "training.epochs"),
        # Overrides after a flag are still overrides, not "unrecognized arguments".
        (("--workers", "1", "training.epochs=zero"), "training.epochs"),
        (("--bogus",), "unrecognized arguments: --bogus"),
        (("output_dir=s3://b/run",), "is a URI"),
    ]
    # separate processes, run side by side: each is mostly its interpreter's start-up
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda case: taskray("train", cfg, *case[0]), cases))
    for done, (_, fragment) in zip(runs, cases, strict=True):
        assert_one_line_error(done, fragment)


def test_missing_model(tmp_path, tiny_bert):
    cfg = _config(tmp_path, tiny_bert)
    done = taskray("train", str(cfg), "--model", str(tmp_path / "no-model"))
    assert_one_line_error(done, "could not be loaded")


def test_info_json():
    done = taskray("info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["attention"] in {"sdpa", "flash_attention_2"}
    assert info["versions"]["ray"].startswith("2.60")


def test_tasks_lists_every_family():
    from tasks import TASKS

    done = taskray("tasks", "--json")
    assert done.returncode == 0
    listed = {d["name"]: d for d in json.loads(done.stdout)}
    assert set(listed) == set(TASKS)
    assert len(listed) == 13
    assert listed["dialogue"]["formulations"] == {"chat": "causal_lm"}
    assert "messages" in listed["dialogue"]["row_schema"]
    table = taskray("tasks").stdout
    for name in TASKS:
        assert name in table


def test_evaluate_bundle(tmp_path, tiny_bundle):
    data = write_jsonl(tmp_path / "eval.jsonl", [*keyword_rows(30), '{"text": 1}'])
    done = taskray("evaluate", str(tiny_bundle), "--data", str(data), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 30
    assert report["rejected"][0]["row"] == 31
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    table = taskray("evaluate", str(tiny_bundle), "--data", str(data))
    assert "accuracy" in table.stdout and "macro_f1" in table.stdout
    missing = taskray("evaluate", str(tmp_path / "nope"), "--data", str(data))
    assert_one_line_error(missing, "bundle not found")


@pytest.mark.parametrize("command", ["train", "evaluate", "serve", "quickstart", "info", "tasks"])
def test_every_command_has_help(command):
    done = taskray(command, "--help")
    assert done.returncode == 0
    assert "usage: taskray" in done.stdout
