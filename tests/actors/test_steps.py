"""The optimisation step in plain processes: accumulation ≡ one big batch, FSDP2 parity and
memory against one process, packing exactness."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from actors.config import OptimOptions
from actors.packing import best_fit_decreasing, block_causal_mask, pack_batch
from actors.steps import accumulate, collate, forward_loss, make_optimizer, shard_model
from tasks import IGNORE_INDEX


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def causal_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of varied length with a prompt part masked out of the labels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(1, 97, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


def batch_of(rows: list[dict]) -> dict:
    return collate({k: [r[k] for r in rows] for k in ("input_ids", "labels")}, 0)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_equals_one_big_batch():
    rows = causal_rows(8)
    big = tiny_llama()
    loss_big, count_big = accumulate("causal_lm", big, [batch_of(rows)])
    small = tiny_llama()
    micro = [batch_of(rows[i : i + 2]) for i in range(0, 8, 2)]
    loss_small, count_small = accumulate("causal_lm", small, micro)
    assert count_small == count_big
    assert loss_small / count_small == pytest.approx(loss_big / count_big, rel=1e-5)
    g_big, g_small = grads(big), grads(small)
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-6)
    # The naive mean of per-micro-batch means is a different (wrong) number here.
    with torch.no_grad():
        means = [float(forward_loss("causal_lm", tiny_llama(), b)[0]) for b in micro]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    naive = sum(m / c for m, c in zip(means, counts, strict=True)) / len(micro)
    assert abs(naive - loss_big / count_big) > 1e-4


def test_packing_is_exact():
    model = tiny_llama().eval()
    rows = causal_rows(6, seed=3)
    packed = pack_batch(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]},
        max_length=64,
    )
    assert sorted(i for g in packed["_rows"] for i in g) == list(range(6))
    batch = collate(packed, 0)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
        for b, members in enumerate(packed["_rows"]):
            start = 0
            for i in members:
                alone = model(input_ids=torch.tensor([rows[i]["input_ids"]])).logits[0]
                n = len(rows[i]["input_ids"])
                torch.testing.assert_close(
                    logits[b, start : start + n], alone, atol=1e-5, rtol=1e-5
                )
                start += n
        packed_loss, packed_count = (
            float(x) for x in (*forward_loss("causal_lm", model, batch)[:1], 0)
        )
        plain = batch_of(rows)
        plain_loss = float(forward_loss("causal_lm", model, plain)[0])
    del packed_count
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)


def test_best_fit_decreasing_and_mask():
    bins = best_fit_decreasing([7, 5, 4, 3, 3, 2, 1], capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum([7, 5, 4, 3, 3, 2, 1][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 25 tokens need at least 3 bins of 10
    mask = block_causal_mask([[2, 3]], 6)[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert mask[5].tolist() == [False, False, False, False, False, True]
    with pytest.raises(ValueError, match="exceeds"):
        best_fit_decreasing([11], capacity=10)


# ----- FSDP2 on gloo vs one process -----------------------------------------------------------
def _run(rank: int, size: int, port: int, steps: int, queue) -> None:
    import torch.distributed as dist

    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    model = tiny_llama()
    unsharded_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > 1:
        model = shard_model(model, use_gpu=False)
    optimizer = make_optimizer(model, OptimOptions(lr=1e-2))
    rows = causal_rows(8 * steps, seed=1)
    losses = []
    for step in range(steps):
        global_batch = rows[step * 8 : (step + 1) * 8]
        mine = global_batch[rank::size]
        loss, count = accumulate("causal_lm", model, [batch_of(mine)])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss / count)

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    state_bytes = sum(local_bytes(p) for p in model.parameters()) + sum(
        local_bytes(v)
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.ndim > 0
    )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:
        # numpy pickles by value (torch tensors would travel as shared-memory handles).
        weights = {k: v.numpy().copy() for k, v in full.items()}
        queue.put((losses, weights, state_bytes, unsharded_bytes))
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()
        # Let the queue's feeder thread hand the result over before this process exits.
        queue.close()
        queue.join_thread()


def test_fsdp2_two_workers_match_one_process_and_shard_memory():
    from tests.conftest import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    _run(0, 1, 0, 5, queue)
    single_losses, single_weights, single_bytes, _ = queue.get()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, 2, port, 5, queue)) for r in range(2)]
    for p in procs:
        p.start()
    fsdp_losses, fsdp_weights, fsdp_bytes, _ = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for a, b in zip(fsdp_losses, single_losses, strict=True):
        assert abs(a - b) / abs(b) < 1e-4
    initial = tiny_llama().state_dict()
    moved = max(
        float((torch.from_numpy(v) - initial[k]).abs().max()) for k, v in single_weights.items()
    )
    assert moved > 1e-2  # training moved the weights far more than the tolerance below
    for name, value in single_weights.items():
        # Adam divides by tiny second moments, so float-order noise of ~1e-7 in a gradient can
        # show as ~1e-5 in a weight after a few steps; 1e-4 is still 100x below `moved`.
        torch.testing.assert_close(
            torch.from_numpy(fsdp_weights[name]), torch.from_numpy(value), rtol=1e-3, atol=1e-4
        )
    assert fsdp_bytes <= 0.6 * single_bytes
