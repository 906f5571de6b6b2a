"""GPU-only paths: flash attention's varlen packing and bf16 FSDP. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash_attn")
def test_flash_attention_varlen_packing_matches_unpacked():
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.modeling import choose_attention
    from actors.packing import pack_batch
    from actors.steps import collate

    assert choose_attention("auto")[0] == "flash_attention_2"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="flash_attention_2",
    )  # fmt: skip
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    rows = [[int(x) for x in torch.randint(1, 97, (n,))] for n in (9, 14, 5)]
    packed = pack_batch({"input_ids": rows, "labels": rows}, max_length=64)
    batch = collate(packed, 0, "cuda", packed_mask=False)
    assert "attention_mask" not in batch  # varlen: sequences delimited by position_ids
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        start = 0
        for i in packed["_rows"][0]:
            alone = model(input_ids=torch.tensor([rows[i]], device="cuda")).logits[0]
            n = len(rows[i])
            torch.testing.assert_close(logits[0, start : start + n], alone, atol=2e-2, rtol=2e-2)
            start += n


def test_bf16_is_chosen_on_capable_gpus():
    from actors.modeling import choose_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert choose_dtype("auto", use_gpu=True) == expected
