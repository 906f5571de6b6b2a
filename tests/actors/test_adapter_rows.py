"""``actors.adapter_rows``: each row's adapter given to PEFT's LoRA layers through hooks that
stay registered gives exactly PEFT's own ``adapter_names`` forward, follows adapters added
later (also on other target modules), refuses unknown names, leaves other threads' calls and
the model after ``remove()`` as PEFT alone would run them."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from actors.adapter_rows import AdapterRows
from tests.actors.test_engine import _llama

ROWS = ["a", "__base__", "b", "a"]


def _peft() -> tuple[Any, torch.Tensor]:
    from peft import LoraConfig, get_peft_model

    model, tok = _llama()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    peft = get_peft_model(model, config, adapter_name="a")
    peft.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False))  # fmt: skip
    ids = tok(["one two three four"] * len(ROWS), return_tensors="pt")["input_ids"]
    return peft.eval(), ids


def _logits(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_rows_equal_pefts_own_mixed_forward_and_follow_new_adapters():
    from peft import LoraConfig

    model, ids = _peft()
    rows = AdapterRows(model)
    want = _logits(model, ids, adapter_names=ROWS)
    with rows.rows(ROWS):
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want[0], want[1]) and not torch.equal(want[0], want[2])

    # an adapter on other modules wraps new layers: the hooks follow it
    model.add_adapter("c", LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj"],
                                      init_lora_weights=False))  # fmt: skip
    names = ["c", "a", "__base__", "c"]
    want = _logits(model, ids, adapter_names=names)
    with rows.rows(names):
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want[0], want[2])

    with pytest.raises(ValueError, match=r"non-existing adapter.*nope"), rows.rows(["a", "nope"]):
        pass


def test_other_threads_and_a_removed_instance_run_as_peft_alone():
    model, ids = _peft()
    plain = _logits(model, ids)  # PEFT's active adapter on every row
    rows = AdapterRows(model)
    other: dict[str, torch.Tensor] = {}
    with rows.rows(ROWS):
        worker = threading.Thread(target=lambda: other.setdefault("out", _logits(model, ids)))
        worker.start()
        worker.join()
    torch.testing.assert_close(other["out"], plain, rtol=0, atol=0)
    rows.remove()
    torch.testing.assert_close(_logits(model, ids), plain, rtol=0, atol=0)
    assert not any(m._forward_pre_hooks for m in model.modules())
