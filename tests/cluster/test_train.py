"""End-to-end Ray Train runs on a tiny random-initialised BERT with 2 workers (FSDP2/gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.config import ModelOptions
from actors.modeling import build_model
from cluster.config import TrainConfig
from cluster.train import run_training
from tests.conftest import read_jsonl, tiny_bert_train_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(tmp_path: Path, tiny_bert: Path, **training) -> TrainConfig:
    return TrainConfig.model_validate(
        tiny_bert_train_config(
            tmp_path,
            tiny_bert,
            train_rows=384,
            val_rows=48,
            training={
                "epochs": 3,
                "batch_size": 16,
                "lr": 5e-3,
                "log_every": 2,
                # Seed 0 happens to start this tiny random model in a long plateau.
                "seed": 1,
                **training,
            },
            scaling={"workers": 2},
        )
    )


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("train")
    cfg = _config(tmp, tiny_bert)
    return cfg, run_training(cfg, progress=lambda *_: None)


def test_two_worker_run_learns_and_changes_parameters(trained, tiny_bert):
    from safetensors.torch import load_file

    cfg, outcome = trained
    log = read_jsonl(Path(cfg.output_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in log if "loss" in r and "step" in r and "eval_loss" not in r]
    assert len(losses) >= 4
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    evals = [r for r in log if "eval_accuracy" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert outcome.metrics["accuracy"] >= 0.9

    torch.manual_seed(cfg.training.seed)
    initial = build_model(
        ModelOptions(name_or_path=str(tiny_bert), init="random"),
        "sequence_classification",
        ["Negative", "Positive"],
    ).model.state_dict()
    final = load_file(str(Path(outcome.bundle) / "model.safetensors"))
    changed = [k for k in final if not torch.equal(final[k], initial[k])]
    assert len(changed) > 0.9 * len(final)


def test_bundle_reloads_with_plain_transformers_and_matches_checkpoint(trained, tiny_bert):
    """The exported weights are exactly the trained (sharded) state of the last epoch."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, outcome = trained
    manifest = json.loads(Path(outcome.bundle, "taskray.json").read_text())
    assert manifest["task"]["labels"] == ["Negative", "Positive"]
    assert manifest["model_kind"] == "sequence_classification"
    assert manifest["base_model"] == str(tiny_bert)
    assert "accuracy" in manifest["metrics"]

    plain = AutoModelForSequenceClassification.from_pretrained(outcome.bundle).eval()
    tok = AutoTokenizer.from_pretrained(outcome.bundle)
    assert plain.config.id2label == {0: "Negative", 1: "Positive"}

    ckpts = sorted(Path(cfg.output_dir, "ray", "train").glob("epoch-*"))
    assert ckpts, "no checkpoints reported"
    last = ckpts[-1]
    assert json.loads((last / "bundle" / "taskray.json").read_text())["epoch"] == 3
    flat = Path(cfg.output_dir, "last.pt")
    dcp_to_torch_save(str(last), str(flat))
    state = torch.load(flat, weights_only=True)["model"]
    reference = AutoModelForSequenceClassification.from_pretrained(outcome.bundle)
    reference.load_state_dict(state)
    reference.eval()

    batch = tok(
        ["the phone was great", "useless hotel honestly"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        a = plain(**batch).logits
        b = reference(**batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rerun_resumes_from_last_checkpoint(trained, tmp_path_factory):
    cfg, _ = trained
    more = cfg.model_copy(deep=True)
    more.training.epochs = 4
    lines: list[str] = []
    outcome = run_training(more, progress=lines.append)
    log = read_jsonl(Path(cfg.output_dir, "metrics.jsonl"))
    evals = [r["epoch"] for r in log if "eval_accuracy" in r]
    # Epochs 1-3 from the first run, then only epoch 4: nothing was retrained.
    assert evals == [1, 2, 3, 4]
    assert json.loads(Path(outcome.bundle, "taskray.json").read_text())["epoch"] == 4
