"""LoRA through PEFT on a 2-worker FSDP2 run: the exported adapter is complete and reproduces
the trained model; merged export equals base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.config import TrainConfig
from cluster.train import run_training
from tests.conftest import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_llama(tmp_path_factory) -> Path:
    """A tiny Llama with weights on disk (LoRA needs a loadable base)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.modeling import resolve_model_path

    source = resolve_model_path("tiny:llama")
    path = tmp_path_factory.mktemp("base-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def _config(tmp: Path, base: Path, merge: bool) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "task": {"name": "generation", "max_length": 128},
            "model": {
                "name_or_path": str(base),
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "merge": merge},
            },
            "data": {"train": str(ROOT / "data/fixtures/generation.jsonl")},
            "training": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "eval_generate_rows": 0},
            "scaling": {"workers": 2},
            "output_dir": str(tmp / "run"),
        }
    )


def test_adapter_from_fsdp_run_is_complete_and_reproduces_training(
    ray_session, tmp_path, base_llama
):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, base_llama, merge=False)
    outcome = run_training(cfg, progress=lambda *_: None)
    bundle = Path(outcome.bundle)
    assert (bundle / "adapter_config.json").is_file()
    assert not (bundle / "model.safetensors").exists()
    assert json.loads((bundle / "taskray.json").read_text())["adapter"] is True

    adapter = load_file(str(bundle / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    base = AutoModelForCausalLM.from_pretrained(base_llama)
    for key, tensor in adapter.items():
        # Complete (unsharded) shapes: A is [r, in_features], B is [out_features, r].
        module_path = key.removeprefix("base_model.model.").split(".lora_")[0]
        linear = base.get_submodule(module_path)
        expected = (4, linear.in_features) if ".lora_A." in key else (linear.out_features, 4)
        assert tuple(tensor.shape) == expected, key

    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_llama), str(bundle)
    ).eval()
    # The trained (sharded) state as the checkpoint holds it, flattened in one process.
    ckpt = sorted(Path(cfg.output_dir, "ray", "train").glob("epoch-*"))[-1]
    dcp_to_torch_save(str(ckpt), str(tmp_path / "ckpt.pt"))
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_llama), str(bundle)
    )
    reference.load_state_dict(trained)
    reference.eval()
    expected = get_peft_model_state_dict(reference)
    for key, tensor in adapter.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert any(float(v.abs().max()) > 0 for v in lora_b), "adapter did not train"

    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_merged_export_equals_base_plus_adapter(ray_session, tmp_path, base_llama):
    from transformers import AutoModelForCausalLM

    from actors.bundle import load_bundle
    from actors.inference import predict_rows

    outcome = run_training(_config(tmp_path, base_llama, merge=True), progress=lambda *_: None)
    bundle = Path(outcome.bundle)
    assert (bundle / "model.safetensors").is_file()
    assert not (bundle / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(bundle)
    base = AutoModelForCausalLM.from_pretrained(base_llama)
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    q_base = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_merged, q_base)  # the adapter's update is folded in
    loaded = load_bundle(bundle)
    row = loaded.task.validate(read_jsonl(ROOT / "data/fixtures/generation.jsonl")[0])
    assert "text" in predict_rows(loaded, [row], max_new_tokens=4)[0]
