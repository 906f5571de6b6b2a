"""The vision-language model in one process: placeholder expansion, stages, bundles, images."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from actors.bundle import BundleError, write_manifest
from actors.config import ModelOptions
from actors.modeling import build_model, resolve_model_path
from actors.steps import collate, forward_loss
from actors.tiny import TINY_VISION
from actors.vlm import answer, load_vlm, patch_features, save_vlm
from tasks import IGNORE_INDEX, RowError, get_task
from tasks.multimodal import load_image

ROW = {"image": "unused.png", "prompt": "What colour is the square?", "answer": "red"}


def png_bytes(colour=(200, 30, 30), size=(40, 40), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("tiny:llama"))


def tiny_vlm(tokenizer, **vision):
    torch.manual_seed(0)
    options = ModelOptions(
        name_or_path="tiny:llama", init="random", vision={**TINY_VISION, **vision}
    )
    return build_model(options, "vision_causal_lm", tokenizer=tokenizer).model


def task_for(model):
    return get_task(
        "multimodal", max_length=64, options={"num_image_tokens": model.num_image_tokens}
    )


def batch_of(model, tokenizer, rows, images):
    task = task_for(model)
    feats = [task.encode_row(r, tokenizer) for r in rows]
    batch = {k: [np.asarray(f[k]) for f in feats] for k in feats[0]}
    batch["pixel_values"] = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return collate(batch, tokenizer.pad_token_id)


def test_placeholders_match_visual_tokens_and_receive_image_features(tokenizer):
    model = tiny_vlm(tokenizer)
    # 32x32 input, 8x8 patches → a 4x4 grid: 16 visual tokens, as the tower itself reports.
    pixels = torch.randn(2, 3, 32, 32)
    assert patch_features(model.vision, pixels, -1).shape[1] == model.num_image_tokens == 16
    task = task_for(model)
    ids = torch.tensor([task.encode_prompt(ROW, tokenizer)] * 2)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    positions = (ids[0] == image_id).nonzero().flatten().tolist()
    assert len(positions) == model.num_image_tokens
    assert positions == list(range(positions[0], positions[0] + 16))  # one contiguous block

    with torch.no_grad():
        merged = model.embed(ids, pixels)
        features = model.image_features(pixels)
        tokens = model.lm.get_input_embeddings()(ids)
    for row in range(2):
        assert torch.equal(merged[row, positions], features[row])  # image i → row i, in order
        text = [i for i in range(ids.shape[1]) if i not in positions]
        assert torch.equal(merged[row, text], tokens[row, text])
    assert not torch.equal(features[0], features[1])

    with pytest.raises(ValueError, match="exactly 16 image tokens"):
        model.embed(ids[:, positions[0] + 1 :], pixels)  # a placeholder cut off
    with pytest.raises(ValueError, match="no image"):
        model.embed(ids, None)


def test_loss_is_on_answer_tokens_only(tokenizer):
    model = tiny_vlm(tokenizer)
    task = task_for(model)
    feats = task.encode_row(ROW, tokenizer)
    supervised = [
        t for t, lab in zip(feats["input_ids"], feats["labels"], strict=True) if lab != IGNORE_INDEX
    ]
    assert tokenizer.decode(supervised, skip_special_tokens=True) == " red"
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert all(
        lab == IGNORE_INDEX
        for t, lab in zip(feats["input_ids"], feats["labels"], strict=True)
        if t == image_id
    )


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize(
    "stage, trains",
    [
        ({"freeze_vision": True, "freeze_lm": True}, {"projector"}),
        ({"freeze_vision": True, "freeze_lm": False}, {"projector", "lm"}),
        ({"freeze_vision": False, "freeze_lm": False}, {"projector", "lm", "vision"}),
    ],
)
def test_stages_train_only_their_parts(tokenizer, stage, trains):
    model = tiny_vlm(tokenizer, **stage)
    rng = np.random.default_rng(0)
    batch = batch_of(model, tokenizer, [ROW, ROW], rng.normal(size=(2, 3, 32, 32)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = forward_loss("vision_causal_lm", model, batch)
    loss.backward()
    optimizer.step()
    parts = {name.split(".")[0] for name in _changed(before, model)}
    assert parts == trains


def test_lora_on_the_lm_trains_adapters_and_projector(tokenizer):
    torch.manual_seed(0)
    options = ModelOptions(
        name_or_path="tiny:llama",
        init="pretrained",
        vision=TINY_VISION,
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
    )
    # tiny:llama has no weights file: build from config, then wrap (what `init: random` does).
    options = options.model_copy(update={"init": "random"})
    model = build_model(options, "vision_causal_lm", tokenizer=tokenizer).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)


def _bundle(model, tokenizer, path):
    task = task_for(model)
    save_vlm(path, model, model.state_dict())
    tokenizer.save_pretrained(path)
    write_manifest(path, task, "tiny:llama")
    return path


def test_bundle_round_trip_and_batched_greedy_equals_single(tokenizer, tmp_path):
    model = tiny_vlm(tokenizer).eval()
    path = _bundle(model, tokenizer, tmp_path / "bundle")
    assert {p.name for p in path.iterdir()} >= {"lm", "vision.safetensors", "vlm.json"}
    loaded = load_vlm(path)
    assert loaded.model.num_image_tokens == 16
    images = [Image.new("RGB", (64, 64), c) for c in [(220, 30, 30), (30, 70, 220), (245, 205, 0)]]
    prompts = ["What colour is the square?", "What shape is blue?", "How many circles?"]
    pixels = torch.stack([loaded.transform(i) for i in images])
    ids = torch.tensor([loaded.task.encode_prompt({"prompt": prompts[0]}, tokenizer)])
    with torch.no_grad():
        original = model(ids, torch.ones_like(ids), pixels[:1]).logits
        reloaded = loaded.model(ids, torch.ones_like(ids), pixels[:1]).logits
    torch.testing.assert_close(original, reloaded)

    batched = answer(loaded, images, prompts, max_new_tokens=6)
    single = [
        answer(loaded, [i], [p], max_new_tokens=6)[0] for i, p in zip(images, prompts, strict=True)
    ]
    assert [b["text"] for b in batched] == [s["text"] for s in single]
    assert all(b["completion_tokens"] > 0 for b in batched)

    (path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(BundleError, match="pickle"):
        load_vlm(path)


def test_vision_bundle_reads_manifest_and_refuses_non_vlm(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="not a multimodal bundle"):
        load_vlm(tiny_bundle)
    assert (
        json.loads((tiny_bundle / "taskray.json").read_text())["model_kind"] != "vision_causal_lm"
    )


# ----- images -------------------------------------------------------------------------------
def test_load_image_accepts_images_and_names_each_problem():
    assert load_image(png_bytes()).size == (40, 40)
    assert load_image(png_bytes(fmt="JPEG")).mode == "RGB"
    with pytest.raises(RowError, match="not an image"):
        load_image(b"hello, I am a text file pretending to be a PNG\n")
    with pytest.raises(RowError, match="corrupt or truncated"):
        load_image(png_bytes()[:60])
    with pytest.raises(RowError, match="over the limit of 1,000 bytes"):
        load_image(png_bytes(size=(200, 200)) + b"\0" * 1000, max_bytes=1000)
    with pytest.raises(RowError, match="2000x2000 pixels"):
        load_image(png_bytes(size=(2000, 2000)), max_pixels=1000 * 1000)
    with pytest.raises(RowError, match="format TIFF is not supported"):
        load_image(png_bytes(fmt="TIFF"))
    with pytest.raises(RowError, match="empty"):
        load_image(b"")


def test_tokenize_rows_decodes_images_and_rejects_bad_ones(tmp_path, tokenizer):
    from actors.preprocess import TokenizeRows
    from actors.vlm import describe_tower

    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(png_bytes()[:50])
    inline = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    info = describe_tower(TINY_VISION["name"], TINY_VISION["kwargs"], None, -1)
    task = get_task("multimodal", max_length=64, options={"num_image_tokens": 16})
    udf = TokenizeRows(task.spec(), resolve_model_path("tiny:llama"), image_config=info)
    images = ["ok.png", inline, "text.png", "broken.png", "missing.png"]
    rows = [{**ROW, "image": i} for i in images]
    data_file = str(tmp_path / "train.jsonl")
    out = udf(
        {
            "_path": np.array([data_file] * len(rows), dtype=object),
            "_row": np.arange(1, len(rows) + 1),
            "_json": np.array([json.dumps(r) for r in rows], dtype=object),
        }
    )
    assert out["pixel_values"].shape == (5, 3, 32, 32)
    errors = list(out["_error"])
    assert errors[:2] == ["", ""]
    assert "not an image" in errors[2]
    assert "corrupt" in errors[3]
    assert "file not found" in errors[4]
    assert not np.allclose(out["pixel_values"][0], 0)
    np.testing.assert_allclose(out["pixel_values"][0], out["pixel_values"][1])  # same picture


def test_long_prompts_keep_the_image_and_the_end_of_the_question(tokenizer):
    task = get_task("multimodal", max_length=40, options={"num_image_tokens": 16})
    long = "context " * 50 + "What colour is the square?"
    ids = task.encode_prompt({"prompt": long}, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == 16
    assert len(ids) <= 40
    assert tokenizer.decode(ids).endswith("What colour is the square?\nAnswer:")


def test_a_second_stage_starts_from_the_first_stages_bundle(tokenizer, tmp_path):
    """Stage 1 (projector only) → bundle → stage 2 with LoRA on the LM: the weights carry
    over, the new stage freezes what it says, and its export merges the adapter."""
    stage1 = tiny_vlm(tokenizer, freeze_vision=True, freeze_lm=True).eval()
    path = _bundle(stage1, tokenizer, tmp_path / "stage1")
    options = ModelOptions(
        name_or_path=str(path),
        vision={"freeze_vision": True, "freeze_lm": True},
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
    )
    stage2 = build_model(options, "vision_causal_lm", tokenizer=tokenizer).model
    trainable = {n.split(".")[0] for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable == {"lm", "projector"}
    assert all("lora_" in n for n, p in stage2.lm.named_parameters() if p.requires_grad)
    for name, value in stage1.projector.state_dict().items():
        assert torch.equal(stage2.projector.state_dict()[name], value)
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([task_for(stage1).encode_prompt(ROW, tokenizer)])
    with torch.no_grad():  # LoRA's B starts at zero: the same function as stage 1
        torch.testing.assert_close(
            stage2(ids, torch.ones_like(ids), pixels).logits,
            stage1(ids, torch.ones_like(ids), pixels).logits,
        )
    # A trained adapter (B ≠ 0) is merged into lm/ at export: plain weights, same function.
    for name, param in stage2.lm.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    stage2.eval()
    out = _bundle(stage2, tokenizer, tmp_path / "stage2")
    assert not any("lora" in p.name for p in (out / "lm").iterdir())
    reloaded = load_vlm(out).model
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids, torch.ones_like(ids), pixels).logits,
            stage2(ids, torch.ones_like(ids), pixels).logits,
            rtol=1e-4,
            atol=1e-4,
        )
