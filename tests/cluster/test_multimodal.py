"""A tiny vision-language model (timm ViT + projector + tiny llama) learns to read colours off
synthetic images through `taskray train` with 2 workers (FSDP2 over the LM blocks), and bad
images are reported, not trained on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cluster.config import TrainConfig, apply_overrides, read_yaml, validate_config
from cluster.train import run_training
from tests.conftest import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def make_shapes():
    """The project's synthetic dataset script, imported from data/fixtures."""
    spec = importlib.util.spec_from_file_location(
        "make_shapes", ROOT / "data/fixtures/make_shapes.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_vlm_learns_colours_and_rejects_bad_images(ray_session, tmp_path):
    from actors.vlm import answer, load_vlm
    from tasks.multimodal import read_image_field

    data = tmp_path / "shapes"
    counts = make_shapes().write_dataset(data, images=450, seed=11, max_shapes=1, kinds="colour")
    # Faults among the training rows: a truncated PNG, a text file posing as a PNG, a path
    # that does not exist. Each must land in rejected.jsonl with its reason.
    good = (data / "images" / "shape-00000.png").read_bytes()
    (data / "images" / "truncated.png").write_bytes(good[:60])
    (data / "images" / "notes.png").write_text("this is a text file, not an image\n")
    bad = ["images/truncated.png", "images/notes.png", "images/nowhere.png"]
    with (data / "train.jsonl").open("a") as f:
        for image in bad:
            f.write(
                json.dumps(
                    {"image": image, "prompt": "What colour is the circle?", "answer": "red"}
                )
                + "\n"
            )

    config = ROOT / "configs" / "multimodal.yaml"
    raw = apply_overrides(
        read_yaml(config),
        [
            f"data.train={data / 'train.jsonl'}",
            f"data.validation={data / 'validation.jsonl'}",
            "data.max_rejected_fraction=0.05",
            f"output_dir={tmp_path / 'run'}",
            "training.epochs=3",
            "training.batch_size=8",
            "training.eval_generate_rows=32",
        ],
    )
    cfg = validate_config(TrainConfig, raw, source=str(config))
    outcome = run_training(cfg, progress=lambda *_: None)

    rejected = read_jsonl(tmp_path / "run" / "rejected.jsonl")
    assert len(rejected) == 3, rejected
    assert outcome.counts["train"] == counts["train"]
    assert outcome.counts["rejected"] == 3
    joined = " | ".join(r["reason"] for r in rejected)
    assert "corrupt or truncated" in joined
    assert "not an image" in joined
    assert "file not found" in joined

    # Held-out images, answered by the exported bundle in this process: chance is 1/4.
    bundle = load_vlm(outcome.bundle)
    rows = read_jsonl(data / "validation.jsonl")[:80]  # 90 held-out images
    images = [read_image_field(r["image"], data) for r in rows]
    preds = answer(bundle, images, [r["prompt"] for r in rows], max_new_tokens=8)
    accuracy = sum(p["text"] == r["answer"] for p, r in zip(preds, rows, strict=True)) / len(rows)
    assert accuracy >= 0.8, (accuracy, [p["text"] for p in preds[:10]])
    assert outcome.metrics["accuracy"] >= 0.8  # the run's own evaluation agrees
