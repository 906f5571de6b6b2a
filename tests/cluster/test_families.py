"""Every task family trains on its fixture from its `configs/<family>.yaml` with a tiny model:
the loss falls, and the bundle reloads and predicts in the family's output shape.

One family per model kind and prompt style goes through `taskray train`'s driver with 2 Ray
Train workers (FSDP2 on gloo); the families that share an engine path with one of those (NLI is
pair classification, NER a token head over the same encoder path as extractive QA, generation,
decoder classification (label tokens) and the other generative families causal or seq2seq LMs
like dialogue and summarization) train the same
config's model in this process with the same step function (``actors.steps``) — each full run
costs ~45 s of Ray start-up and the suite has a time budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actors.bundle import load_bundle, write_manifest
from actors.inference import predict_rows
from cluster.config import TrainConfig, apply_overrides, read_yaml, validate_config
from cluster.train import run_training
from tests.conftest import read_jsonl

ROOT = Path(__file__).resolve().parents[2]

# config file → keys every prediction must carry (DESIGN.md's "output a user sees")
FAMILIES = {
    "generation": {"text"},
    "dialogue": {"role", "content"},
    "classification-decoder": {"label", "score"},
    "nli": {"label", "score"},
    "extractive-qa": {"answer", "start", "end", "score"},
    "generative-qa": {"text"},
    "ner": {"tags", "entities", "Person", "Organization"},
    "summarization": {"text"},
    "translation": {"text"},
    "code": {"code"},
    "reasoning": {"steps", "answer"},
    "rag": {"answer", "citations"},
}
THROUGH_RAY = [
    "dialogue",  # a causal LM with chat-template masks (generation shares its engine path)
    "extractive-qa",  # one row → several windows through Ray Data
    "summarization",  # seq2seq
]
IN_PROCESS = sorted(set(FAMILIES) - set(THROUGH_RAY))


def _config(name: str, tmp_path: Path, *overrides: str) -> TrainConfig:
    path = ROOT / "configs" / f"{name}.yaml"
    data = apply_overrides(
        read_yaml(path),
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={ROOT / read_yaml(path)['data']['train']}",
            *overrides,
        ],
    )
    return validate_config(TrainConfig, data, source=str(path))


def _predicts(name: str, bundle_dir: str, cfg: TrainConfig) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.task.name == cfg.task.name
    manifest = json.loads((Path(bundle_dir) / "taskray.json").read_text())
    assert manifest["model_kind"] == bundle.task.model_kind
    rows = [bundle.task.validate(r) for r in read_jsonl(Path(cfg.data.train))[:2]]
    predictions = predict_rows(bundle, rows, max_new_tokens=8)
    assert len(predictions) == 2
    for prediction in predictions:
        assert FAMILIES[name] <= set(prediction), prediction


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("name", THROUGH_RAY)
def test_family_trains_and_bundle_predicts(name, ray_session, tmp_path):
    # Two epochs (the configs say 3): enough to see the loss fall and an epoch-end resume
    # point, and each epoch costs an evaluation and a checkpoint with a bundle.
    cfg = _config(name, tmp_path, "training.epochs=2")
    outcome = run_training(cfg, progress=lambda *_: None)

    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 2
    assert losses[-1] < losses[0], f"{name}: loss did not fall: {losses}"
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) == cfg.training.epochs

    _predicts(name, outcome.bundle, cfg)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_family_trains_in_process_and_bundle_predicts(name, tmp_path):
    import torch

    from actors.modeling import build_model, resolve_model_path
    from actors.preprocess import load_tokenizer
    from actors.steps import accumulate, collate, make_optimizer
    from tasks import RowError, get_task

    cfg = _config(name, tmp_path)
    task = get_task(
        cfg.task.name,
        formulation=cfg.task.formulation,
        max_length=cfg.task.max_length,
        labels=cfg.task.labels,
        options=cfg.task.options,
    )
    rows = [task.validate(r) for r in read_jsonl(Path(cfg.data.train))]
    if task.uses_label_set and task.labels is None:
        task.set_labels(task.sort_labels({v for r in rows for v in task.label_values(r)}))
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.tokenizer or cfg.model.name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    features = []
    for item in task.encode_batch(rows[:16], tokenizer):
        if not isinstance(item, RowError):
            features.extend(item if isinstance(item, list) else [item])
    assert len(features) >= 8

    torch.manual_seed(0)
    model = build_model(cfg.model, task.model_kind, task.labels).model
    optimizer = make_optimizer(model, cfg.training)
    keys = [k for k in features[0] if k not in ("word_ids", "offset_mapping")]
    batch = collate({k: [np.asarray(f[k]) for f in features] for k in keys}, tokenizer.pad_token_id)
    losses = []
    for _ in range(12):
        loss_sum, count = accumulate(task.model_kind, model, [batch])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_sum / count)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), f"{name}: loss did not fall: {losses}"

    bundle = tmp_path / "bundle"
    model.save_pretrained(bundle, safe_serialization=True)
    tokenizer.save_pretrained(bundle)
    write_manifest(bundle, task, cfg.model.name_or_path)
    _predicts(name, str(bundle), cfg)
