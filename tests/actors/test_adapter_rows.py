"""``actors.adapter_rows``: each row's adapter, applied in one forward, equals that adapter
applied alone (PEFT with only it active) and PEFT's own ``adapter_names`` forward, with
adapters of different ranks and scalings on different modules, follows adapters added, deleted
and loaded anew, refuses unknown names, leaves layers PEFT must run itself to PEFT, and leaves
other threads' calls and the model after ``remove()`` as PEFT alone would run them."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from actors.adapter_rows import AdapterRows
from tests.actors.test_engine import _llama

ROWS = ["a", "__base__", "b", "a"]


def _lora(seed: int, **kwargs: Any) -> Any:
    from peft import LoraConfig

    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **kwargs}
    return LoraConfig(init_lora_weights=False, **options)


def _peft() -> tuple[Any, torch.Tensor]:
    """A tiny llama with adapter ``a`` (r=4 on q/v) and ``b`` (r=8, rsLoRA scaling, on q/v/o,
    rank 2 on the first layer's q)."""
    from peft import get_peft_model

    model, tok = _llama()
    peft = get_peft_model(model, _lora(1), adapter_name="a")
    b = _lora(2, r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
               rank_pattern={"layers.0.self_attn.q_proj": 2})  # fmt: skip
    peft.add_adapter("b", b)
    ids = tok(["one two three four"] * len(ROWS), return_tensors="pt")["input_ids"]
    return peft.eval(), ids


def _logits(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _alone(model: Any, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each row through PEFT with only its own adapter active (the base with none)."""
    out = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                out.append(_logits(model, ids[row : row + 1]))
        else:
            model.set_adapter(name)
            out.append(_logits(model, ids[row : row + 1]))
    return torch.cat(out)


def test_each_row_equals_its_adapter_alone_and_pefts_mixed_forward():
    from peft.tuners.lora.layer import Linear

    model, ids = _peft()
    rows = AdapterRows(model)
    want = _alone(model, ids, ROWS)
    peft_mixed = _logits(model, ids, adapter_names=ROWS)
    # PEFT's per-adapter path is not taken for its LoRA Linear layers
    mixed_forward = Linear._mixed_batch_forward
    Linear._mixed_batch_forward = None  # type: ignore[method-assign,assignment]
    try:
        with rows.rows(ROWS):
            got = _logits(model, ids)
    finally:
        Linear._mixed_batch_forward = mixed_forward  # type: ignore[method-assign]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, peft_mixed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[0], want[1]) and not torch.allclose(want[0], want[2])
    assert not torch.allclose(want[1], want[2])


def test_rows_follow_adapters_added_deleted_and_loaded_anew():
    model, ids = _peft()
    rows = AdapterRows(model)
    with rows.rows(ROWS):
        _logits(model, ids)  # stacks built for {a, b}
    # an adapter on other modules wraps new layers
    model.add_adapter("c", _lora(3, target_modules=["k_proj", "o_proj"]))
    names = ["c", "a", "__base__", "b"]
    with rows.rows(names):
        got = _logits(model, ids)
    torch.testing.assert_close(got, _alone(model, ids, names), rtol=1e-5, atol=1e-5)
    # c deleted and added again under its name with other weights: the same names in the same
    # order, and no forward in between
    model.delete_adapter("c")
    model.add_adapter("c", _lora(4, target_modules=["k_proj", "o_proj"]))
    with rows.rows(names):
        got = _logits(model, ids)
    torch.testing.assert_close(got, _alone(model, ids, names), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match=r"non-existing adapter.*nope"), rows.rows(["a", "nope"]):
        pass


def test_a_changed_scale_an_alora_active_adapter_and_many_sets_are_followed():
    from peft import get_peft_model

    model, ids = _peft()
    rows = AdapterRows(model)
    with rows.rows(ROWS):
        _logits(model, ids)
    from peft.tuners.lora import LoraLayer

    for module in model.modules():  # PEFT's own in-place rescaling, folded into the stacks
        if isinstance(module, LoraLayer) and "a" in module.scaling:
            module.set_scale("a", 3.0)
    with rows.rows(ROWS):
        got = _logits(model, ids)
    torch.testing.assert_close(got, _alone(model, ids, ROWS), rtol=1e-5, atol=1e-5)
    # more sets of adapters than are kept: the least recently used go
    model.add_adapter("c", _lora(3))
    for names in (["a"], ["b"], ["c"], ["a", "b"], ["a", "c"], ["b", "c"]):
        rows_names = [names[0], "__base__", names[-1], names[0]]
        with rows.rows(rows_names):
            got = _logits(model, ids)
        torch.testing.assert_close(got, _alone(model, ids, rows_names), rtol=1e-5, atol=1e-5)
    assert list(rows._stacks) == [("c",), ("a", "b"), ("a", "c"), ("b", "c")]

    # an aLoRA adapter as the active one: the model passes its offsets to every LoRA layer
    base, tok = _llama()
    invocation = tok("two three", add_special_tokens=False)["input_ids"]
    alora = _lora(1, alora_invocation_tokens=invocation, task_type="CAUSAL_LM")
    model = get_peft_model(base, alora, adapter_name="x")
    model.add_adapter("b", _lora(2, task_type="CAUSAL_LM"))
    model.eval()
    names = ["b", "__base__", "b", "__base__"]
    with AdapterRows(model).rows(names):
        got = _logits(model, ids)
    torch.testing.assert_close(got, _logits(model, ids, adapter_names=names), rtol=1e-5, atol=1e-5)


def test_layers_and_calls_peft_must_run_go_to_peft():
    from peft.tuners.lora.layer import Linear

    model, ids = _peft()
    rows = AdapterRows(model)
    calls = []
    mixed_forward = Linear._mixed_batch_forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        return mixed_forward(self, *args, **kwargs)

    Linear._mixed_batch_forward = counted  # type: ignore[method-assign]
    try:
        # an adapter with a LoRA bias: its layers run PEFT's own mixed forward, exactly
        model.add_adapter("e", _lora(5, lora_bias=True))
        names = ["e", "a", "__base__", "e"]
        want = _logits(model, ids, adapter_names=names)
        calls.clear()
        with rows.rows(names):
            got = _logits(model, ids)
        assert set(calls) == {m for m in rows._linears if "e" in m.lora_A}  # not b's o_proj
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with rows.rows(ROWS), pytest.raises(ValueError, match="Length of `adapter_names`"):
            _logits(model, ids[:2])  # PEFT's own check of the row count
    finally:
        Linear._mixed_batch_forward = mixed_forward  # type: ignore[method-assign]
    model.train()  # as PEFT, no mixed batch in training mode (dropout)
    with pytest.raises(ValueError, match="training mode"), rows.rows(ROWS):
        pass
    model.eval()
    # a DoRA adapter is PEFT's to run, and PEFT refuses it in a mixed batch
    model.add_adapter("d", _lora(6, use_dora=True))
    with rows.rows(["d", "a", "a", "a"]), pytest.raises(ValueError, match="DoRA"):
        _logits(model, ids)


def test_a_packed_row_takes_each_tokens_adapter_where_packs_allows():
    model, _ = _peft()
    rows = AdapterRows(model)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    names = ["a", "a", "__base__", "b", "b", "a"]
    torch.manual_seed(0)
    x = torch.randn(1, len(names), layer.in_features)
    assert rows.packs(["a", "b", "__base__"])
    with torch.no_grad():
        with rows.packed(names):
            got = layer(x)
        want = []
        for t, name in enumerate(names):
            if name == "__base__":
                want.append(layer.base_layer(x[:, t : t + 1]))
            else:
                model.set_adapter(name)
                want.append(layer(x[:, t : t + 1]))
    torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want[0], layer.base_layer(x[:, :1]))

    # a LoRA bias (PEFT's own forward), an embedding adapter or a fully trained module (PEFT's
    # layers): rows only
    model.add_adapter("e", _lora(5, lora_bias=True))
    model.add_adapter("m", _lora(6, target_modules=["embed_tokens"]))
    model.add_adapter("s", _lora(7, modules_to_save=["lm_head"]))
    assert rows.packs(["a", "b"]) and not rows.packs(["a", "e"]) and not rows.packs(["m"])
    assert not rows.packs(["s"])
    ids = torch.tensor([[5, 6, 7]])
    for name in ("e", "m", "s"):
        with rows.packed([name, "a", "a"]), pytest.raises(ValueError, match="per token"):
            _logits(model, ids)


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
    assert not any(m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())
