"""The Ray Train worker loop: build, shard (FSDP2), train, evaluate, checkpoint, export.

Runs inside each Ray Train worker. The driver (``cluster.train``) passes a ``WorkerConfig`` as
a plain dict and the tokenised datasets ``train`` (split across workers by Ray Data) and
``validation`` (read whole by every worker, evaluated strided across ranks).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from actors.bundle import write_manifest
from actors.config import ModelOptions, OptimOptions
from actors.modeling import build_model, transformer_blocks
from actors.preprocess import load_tokenizer
from tasks import IGNORE_INDEX, Task, task_from_spec

FEATURES = ("input_ids", "attention_mask", "token_type_ids", "labels")
STATE_FILE = "train_state.json"


class WorkerConfig(BaseModel):
    """Everything a worker needs, serialisable to a dict for ``train_loop_config``."""

    model_config = ConfigDict(extra="forbid")

    task: dict[str, Any]
    model: ModelOptions
    base_model: str
    optim: OptimOptions
    tokenizer_path: str
    train_rows: int
    run_dir: str
    use_gpu: bool = False


# ----- batches ------------------------------------------------------------------------------
def collate(batch: dict[str, Any], pad_token_id: int, device: torch.device) -> dict[str, Any]:
    """Pad a numpy batch of ragged features to the longest row and move it to ``device``."""
    out: dict[str, Any] = {}
    lengths = [len(x) for x in batch["input_ids"]]
    longest = max(lengths)
    for key in FEATURES:
        if key not in batch:
            continue
        values = batch[key]
        first = np.asarray(values[0])
        if first.ndim == 0:
            out[key] = torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)
            continue
        pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
        arr = np.full((len(values), longest), pad, dtype=np.int64)
        for i, v in enumerate(values):
            arr[i, : len(v)] = v
        out[key] = torch.as_tensor(arr, device=device)
    return out


def supervised_targets(kind: str, labels: torch.Tensor) -> torch.Tensor:
    """The labels the loss sees (causal LMs predict token t+1 from position t)."""
    return labels[:, 1:] if kind == "causal_lm" else labels


def loss_sum_and_count(kind: str, logits: torch.Tensor, labels: torch.Tensor):
    """Summed cross-entropy and the number of supervised targets in a micro-batch.

    Summing (not averaging) lets the loop divide by the supervised count of the whole global
    batch, across accumulation steps and ranks, instead of averaging per-micro-batch means.
    """
    if kind == "causal_lm":
        logits = logits[:, :-1, :]
    labels = supervised_targets(kind, labels)
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (flat_labels != IGNORE_INDEX).sum()
    return loss, count


# ----- distributed helpers ------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(value: float | int, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return float(t.item())


def shard_model(model: torch.nn.Module, use_gpu: bool) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh("cuda" if use_gpu else "cpu", (world,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if use_gpu and torch.cuda.is_bf16_supported():
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in reversed(transformer_blocks(model)):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def make_optimizer(model: torch.nn.Module, optim: OptimOptions) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lname = name.lower()
        if param.ndim < 2 or "norm" in lname or lname.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr)


# ----- evaluation ---------------------------------------------------------------------------
def evaluate(
    model: torch.nn.Module,
    task: Task,
    dataset: Any,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
) -> dict[str, float]:
    """The task's metrics on the whole validation set; every rank returns the same numbers.

    Each rank evaluates every world-th batch. FSDP needs all ranks to run the same number of
    forwards, so a rank with fewer batches repeats one and discards the output.
    """
    rank, world = _world()
    model.eval()
    mine: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    total = 0
    for i, batch in enumerate(dataset.iter_batches(batch_size=batch_size, batch_format="numpy")):
        total += 1
        if first is None:
            first = batch
        if i % world == rank:
            mine.append(batch)
    predictions: list[dict] = []
    rows: list[dict] = []
    loss_sum, loss_count = 0.0, 0
    with torch.no_grad():
        for i in range(math.ceil(total / world)):
            real = i < len(mine)
            batch = mine[i] if real else first
            if batch is None:
                break
            inputs = collate(batch, pad_token_id, device)
            labels = inputs.pop("labels", None)
            logits = model(**inputs).logits
            if not real:
                continue
            if labels is not None:
                s, c = loss_sum_and_count(task.model_kind, logits, labels)
                loss_sum += float(s)
                loss_count += int(c)
            predictions.extend(task.decode(logits.float().cpu().numpy()))
            rows.extend(json.loads(str(j)) for j in batch["_json"])
    gathered: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, (predictions, rows, loss_sum, loss_count))
    else:
        gathered = [(predictions, rows, loss_sum, loss_count)]
    all_preds = [p for g in gathered for p in g[0]]
    all_rows = [r for g in gathered for r in g[1]]
    metrics = task.metrics(all_preds, all_rows)
    count = sum(g[3] for g in gathered)
    if count:
        metrics["loss"] = sum(g[2] for g in gathered) / count
    model.train()
    return {f"eval_{k}": v for k, v in metrics.items()}


# ----- checkpoints --------------------------------------------------------------------------
def save_checkpoint(
    directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Sharded DCP checkpoint of model + optimizer; rank 0 adds the loop state as JSON."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    if _world()[0] == 0:
        Path(directory, STATE_FILE).write_text(json.dumps(state))


def load_checkpoint(
    directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore model + optimizer from a DCP checkpoint; return the loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return json.loads(Path(directory, STATE_FILE).read_text())


def export_bundle(
    directory: str,
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    base_model: str,
    metrics: dict[str, float],
    extra: dict[str, Any],
) -> None:
    """Gather the full (unsharded) weights and write a bundle from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if _world()[0] != 0:
        return
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, state_dict=full, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_manifest(directory, task, base_model, metrics, extra)


# ----- the loop -----------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; see the module docstring."""
    import ray.train
    from ray.train import Checkpoint
    from transformers import get_scheduler

    cfg = WorkerConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    optim = cfg.optim
    torch.manual_seed(optim.seed)
    np.random.seed(optim.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    task = task_from_spec(cfg.task)
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    built = build_model(cfg.model, task.model_kind, task.labels, use_gpu=cfg.use_gpu)
    model = built.model.to(device)
    if rank == 0:
        print(
            f"[taskray] model {cfg.base_model} ({task.model_kind}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
            f"attention={built.attn_implementation} ({built.attn_reason}), "
            f"dtype={str(built.dtype).replace('torch.', '')}, workers={world}"
            + (", FSDP2" if world > 1 else ""),
            flush=True,
        )
    if world > 1:
        model = shard_model(model, cfg.use_gpu)
    model.train()
    optimizer = make_optimizer(model, optim)

    rows_per_worker = cfg.train_rows // world  # Ray's equal split
    micro_per_epoch = max(1, math.ceil(rows_per_worker / optim.batch_size))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / optim.grad_accum))
    total_steps = steps_per_epoch * optim.epochs
    scheduler = get_scheduler(
        optim.scheduler,
        optimizer,
        num_warmup_steps=int(optim.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    start_epoch, global_step = 0, 0
    best: float | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step, best = state["epoch"] + 1, state["global_step"], state["best"]
        if rank == 0:
            print(f"[taskray] resumed after epoch {start_epoch} (step {global_step})", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("validation")
    metrics_file = Path(cfg.run_dir, "metrics.jsonl")
    parameters = [p for p in model.parameters() if p.requires_grad]

    for epoch in range(start_epoch, optim.epochs):
        t_epoch = time.perf_counter()
        window: list[dict[str, Any]] = []
        running_loss, running_count, tokens, samples = 0.0, 0.0, 0, 0
        t_log = time.perf_counter()
        batches = train_shard.iter_batches(
            batch_size=optim.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=max(optim.batch_size * 8, 256),
            local_shuffle_seed=optim.seed * 1000 + epoch * world + rank,
        )
        micro_iter = iter(batches)
        step_in_epoch = 0
        exhausted = False
        while not exhausted:
            window = []
            for _ in range(optim.grad_accum):
                try:
                    window.append(next(micro_iter))
                except StopIteration:
                    exhausted = True
                    break
            # Every rank holds the same number of micro-batches (equal split), so all ranks
            # agree on whether this window is empty.
            if not window:
                break
            inputs_list = [collate(b, pad_id, device) for b in window]
            local_count = sum(
                int((supervised_targets(task.model_kind, x["labels"]) != IGNORE_INDEX).sum())
                for x in inputs_list
            )
            global_count = _all_sum(local_count, device)
            step_loss = 0.0
            for inputs in inputs_list:
                labels = inputs.pop("labels")
                logits = model(**inputs).logits
                loss_sum, _ = loss_sum_and_count(task.model_kind, logits, labels)
                # FSDP averages gradients over ranks; scale so the result is the mean over the
                # supervised targets of the global batch.
                (loss_sum * world / max(global_count, 1.0)).backward()
                step_loss += float(loss_sum.detach())
                tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else 0
                samples += int(labels.shape[0])
            grad_norm = None
            if optim.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, optim.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            step_in_epoch += 1
            running_loss += _all_sum(step_loss, device)
            running_count += global_count
            if global_step % optim.log_every == 0 or exhausted:
                elapsed = time.perf_counter() - t_log
                loss = running_loss / max(running_count, 1.0)
                tok_s = _all_sum(tokens, device) / max(elapsed, 1e-9)
                record = {
                    "epoch": epoch + 1,
                    "step": global_step,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": tok_s,
                    "samples_per_s": _all_sum(samples, device) / max(elapsed, 1e-9),
                }
                if rank == 0:
                    print(
                        f"[taskray] epoch {epoch + 1}/{optim.epochs} "
                        f"step {step_in_epoch}/{steps_per_epoch} loss {loss:.4f} "
                        f"lr {record['lr']:.2e} {tok_s:,.0f} tok/s",
                        flush=True,
                    )
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                running_loss, running_count, tokens, samples = 0.0, 0.0, 0, 0
                t_log = time.perf_counter()

        metrics = evaluate(model, task, val_ds, optim.eval_batch_size, pad_id, device)
        metrics["epoch"] = epoch + 1
        metrics["step"] = global_step
        metrics["epoch_seconds"] = time.perf_counter() - t_epoch
        if optim.select_metric:
            value = metrics.get(f"eval_{optim.select_metric}")
            if value is not None and (best is None or value > best):
                best = value
        if rank == 0:
            shown = ", ".join(
                f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k.startswith("eval_")
            )
            print(f"[taskray] epoch {epoch + 1} evaluation: {shown}", flush=True)
            with metrics_file.open("a") as f:
                f.write(json.dumps(metrics) + "\n")

        with tempfile.TemporaryDirectory(prefix="taskray-ckpt-") as tmp:
            state = {
                "epoch": epoch,
                "global_step": global_step,
                "best": best,
                "scheduler": scheduler.state_dict(),
            }
            save_checkpoint(tmp, model, optimizer, state)
            export_bundle(
                os.path.join(tmp, "bundle"),
                model,
                tokenizer,
                task,
                cfg.base_model,
                {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")},
                {"epoch": epoch + 1, "attn_implementation": built.attn_implementation},
            )
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"epoch-{epoch + 1:04d}",
            )
