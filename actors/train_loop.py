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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from actors.bundle import write_manifest
from actors.config import ModelOptions, OptimOptions
from actors.modeling import build_model
from actors.observe import (
    MetricsSink,
    console_event,
    flops_per_token,
    measure_peak_flops,
    peak_memory_mb,
    say,
)
from actors.preprocess import load_tokenizer
from actors.steps import (
    accumulate,
    all_sum,
    collate,
    forward_loss,
    make_optimizer,
    shard_model,
    supervised_count,
    world,
)
from tasks import IGNORE_INDEX, Task, task_from_spec

STATE_FILE = "train_state.json"
GENERATIVE = ("causal_lm", "seq2seq_lm")
VLM = "vision_causal_lm"


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


# ----- evaluation ---------------------------------------------------------------------------
def _lockstep(items: list[Any], rank: int, size: int) -> Iterator[tuple[Any, bool]]:
    """This rank's share of ``items`` (every size-th), padded so that every rank yields the
    same number of times: FSDP needs all ranks in each forward. Padding repeats are ``False``."""
    mine = items[rank::size]
    for i in range(math.ceil(len(items) / size) if items else 0):
        yield (mine[i], True) if i < len(mine) else (items[0], False)


def _gather(obj: Any) -> list[Any]:
    size = world()[1]
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _row_outputs(task: Task, out: Any, batch: dict[str, Any]) -> list[Any]:
    """Per-row raw outputs for ``task.decode`` (the shape each encoder head's decode takes)."""
    kind = task.model_kind
    if kind == "sequence_classification":
        return list(out.logits.float().cpu().numpy())
    lengths = [len(x) for x in batch["input_ids"]]
    if kind == "token_classification":
        logits = out.logits.float().cpu().numpy()
        return [
            {"logits": logits[i, :n], "word_ids": list(batch["word_ids"][i])}
            for i, n in enumerate(lengths)
        ]
    if kind == "question_answering":
        s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        return [
            {
                "start_logits": s[i, :n],
                "end_logits": e[i, :n],
                "offset_mapping": np.asarray(batch["offset_mapping"][i]).reshape(-1, 2).tolist(),
            }
            for i, n in enumerate(lengths)
        ]
    return []


def evaluate(
    model: Any, task: Task, dataset: Any, optim: OptimOptions, tokenizer: Any, device: Any
) -> dict[str, float]:
    """Validation loss on every row, and the task's own metrics (every rank gets the same)."""
    rank, size = world()
    kind = task.model_kind
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    batches = list(dataset.iter_batches(batch_size=optim.eval_batch_size, batch_format="numpy"))
    loss_sum, count = 0.0, 0
    outputs: list[tuple[str, Any]] = []  # (row key, raw output) in dataset order
    rows: dict[str, dict] = {}
    with torch.no_grad():
        for batch, real in _lockstep(batches, rank, size):
            inputs = collate(batch, pad_id, device)
            loss, out = forward_loss(kind, model, inputs)
            if not real:
                continue
            loss_sum += float(loss)
            count += supervised_count(kind, inputs)
            keys = [f"{r}" for r in batch["_row"]]
            for key, js in zip(keys, batch["_json"], strict=True):
                rows.setdefault(key, json.loads(str(js)))
            if kind == VLM:
                outputs.extend(zip(keys, _vlm_prompts(batch), strict=True))
            else:
                outputs.extend(zip(keys, _row_outputs(task, out, batch), strict=False))
    gathered = _gather((loss_sum, count, outputs, rows))
    metrics: dict[str, float] = {}
    total = sum(g[1] for g in gathered)
    if total:
        metrics["loss"] = sum(g[0] for g in gathered) / total
    all_rows: dict[str, dict] = {}
    for g in gathered:
        all_rows.update(g[3])
    keys = sorted(all_rows, key=int)
    if kind in ("sequence_classification", "token_classification"):
        by_key = {k: o for g in gathered for k, o in g[2]}
        preds = task.decode([by_key[k] for k in keys], [all_rows[k] for k in keys])
        metrics.update(task.metrics(preds, [all_rows[k] for k in keys]))
    elif kind == "question_answering":
        windows: dict[str, list] = {}
        for g in gathered:
            for k, o in g[2]:
                windows.setdefault(k, []).append(o)
        preds = task.decode([windows[k] for k in keys], [all_rows[k] for k in keys])
        metrics.update(task.metrics(preds, [all_rows[k] for k in keys]))
    elif kind == VLM and optim.eval_generate_rows > 0:
        by_key = {k: o for g in gathered for k, o in g[2]}
        chosen = keys[: optim.eval_generate_rows]
        metrics.update(
            vlm_generate_metrics(
                model,
                task,
                [by_key[k] for k in chosen],
                [all_rows[k] for k in chosen],
                optim,
                tokenizer,
                device,
            )
        )
    elif kind in GENERATIVE and optim.eval_generate_rows > 0:
        subset = [all_rows[k] for k in keys[: optim.eval_generate_rows]]
        metrics.update(generate_metrics(model, task, subset, optim, tokenizer, device))
    model.train()
    return {f"eval_{k}": v for k, v in metrics.items()}


def generate_metrics(
    model: Any, task: Task, rows: list[dict], optim: OptimOptions, tokenizer: Any, device: Any
) -> dict[str, float]:
    """Greedy-decode ``rows`` (strided over ranks, in lockstep) and score the decoded outputs."""
    rank, size = world()
    if task.formulation == "decoder":  # classification: score every label's tokens
        from actors.inference import label_scores

        scored: list[tuple[int, list[float]]] = []
        for (index, row), real in _lockstep(list(enumerate(rows)), rank, size):
            values = label_scores(model, task, tokenizer, row, device)
            if real:
                scored.append((index, values))
        ordered_scores = sorted(s for g in _gather(scored) for s in g)
        preds = task.decode([v for _, v in ordered_scores])
        return task.metrics(preds, [rows[i] for i, _ in ordered_scores])
    tokenizer.padding_side = "left" if task.model_kind == "causal_lm" else "right"
    chunks = [
        rows[i : i + optim.eval_batch_size] for i in range(0, len(rows), optim.eval_batch_size)
    ]
    texts: list[tuple[int, str]] = []
    for (index, chunk_rows), real in _lockstep(list(enumerate(chunks)), rank, size):
        prompts = [task.generation_prompt(r, tokenizer) for r in chunk_rows]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=optim.eval_max_new_tokens,
                do_sample=False,
                synced_gpus=size > 1,
                pad_token_id=tokenizer.pad_token_id,
            )
        if not real:
            continue
        new = out[:, enc["input_ids"].shape[1] :] if task.model_kind == "causal_lm" else out
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        texts.extend((index * optim.eval_batch_size + i, t) for i, t in enumerate(decoded))
    ordered = sorted(t for g in _gather(texts) for t in g)
    preds = task.decode([t for _, t in ordered])
    return task.metrics(preds, [rows[i] for i, _ in ordered])


def _vlm_prompts(batch: dict[str, Any]) -> list[tuple[list[int], np.ndarray]]:
    """Each row's prompt ids (the tokens before its answer) and image, for generation."""
    out = []
    for ids, labels, pixels in zip(
        batch["input_ids"], batch["labels"], batch["pixel_values"], strict=True
    ):
        labels = np.asarray(labels)
        answer_at = int(np.argmax(labels != IGNORE_INDEX))
        out.append((list(np.asarray(ids)[:answer_at]), np.asarray(pixels)))
    return out


def vlm_generate_metrics(
    model: Any,
    task: Task,
    prompts: list[tuple[list[int], np.ndarray]],
    rows: list[dict],
    optim: OptimOptions,
    tokenizer: Any,
    device: Any,
) -> dict[str, float]:
    """Greedy answers of a vision-language model on validation images, scored by the task."""
    from actors.generation import stop_token_ids

    rank, size = world()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    step = optim.eval_batch_size
    chunks = [list(range(i, min(i + step, len(prompts)))) for i in range(0, len(prompts), step)]
    lm = model.lm
    texts: list[tuple[int, str]] = []
    for indices, real in _lockstep(chunks, rank, size):
        width = max(len(prompts[i][0]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for j, i in enumerate(indices):  # left padding: answers start at the same column
            n = len(prompts[i][0])
            ids[j, width - n :] = torch.tensor(prompts[i][0])
            mask[j, width - n :] = 1
        pixels = torch.as_tensor(np.stack([prompts[i][1] for i in indices]))
        with torch.no_grad():
            out = model.generate(
                ids.to(device),
                mask.to(device),
                pixels.to(device),
                max_new_tokens=optim.eval_max_new_tokens,
                do_sample=False,
                synced_gpus=size > 1,
                pad_token_id=pad_id,
                eos_token_id=stop_token_ids(tokenizer, lm),
            )
        if real:
            decoded = tokenizer.batch_decode(out, skip_special_tokens=True)
            texts.extend((i, t) for i, t in zip(indices, decoded, strict=True))
    ordered = sorted(t for g in _gather(texts) for t in g)
    preds = task.decode([t for _, t in ordered])
    return task.metrics(preds, [rows[i] for i, _ in ordered])


# ----- checkpoints --------------------------------------------------------------------------
def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(directory: str, model: Any, optimizer: Any, state: dict) -> None:
    """Sharded DCP checkpoint of model + optimizer, each rank's RNG state (dropout must draw
    the same masks after a resume), and the loop state as JSON from rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    rank = world()[0]
    torch.save(_rng_state(), os.path.join(directory, _rng_file(rank)))
    if rank == 0:
        Path(directory, STATE_FILE).write_text(json.dumps(state))


def load_checkpoint(directory: str, model: Any, optimizer: Any) -> dict:
    """Restore model, optimizer and this rank's RNG from a checkpoint; return the loop state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rng_path = Path(directory, _rng_file(world()[0]))
    if rng_path.exists():  # absent when the world size changed: the data order changes anyway
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads(Path(directory, STATE_FILE).read_text())


def checkpoint_problem(directory: str | Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from (``None`` when it looks complete).

    A checkpoint is written in order: shards, DCP's ``.metadata`` (last of the DCP save), each
    rank's RNG state, then ``train_state.json`` from rank 0 — so a checkpoint cut short by a
    crash lacks the files written last.
    """
    path = Path(directory)
    if not path.is_dir():
        return "not a directory"
    if not (path / ".metadata").is_file():
        return "no .metadata (half-written: the save did not finish)"
    state = path / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE} (half-written: the save did not finish)"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    return None


def _older_checkpoints(latest: Path) -> list[Path]:
    """The run's other checkpoints (siblings of ``latest`` that Ray kept), newest first."""
    found = []
    for sibling in latest.parent.iterdir():
        if sibling == latest or not sibling.name.startswith(("step-", "epoch-")):
            continue
        try:
            step = json.loads((sibling / STATE_FILE).read_text())["global_step"]
        except (OSError, ValueError, KeyError):
            continue  # incomplete: checkpoint_problem will say so if it is ever tried
        found.append((int(step), sibling))
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def restore_checkpoint(
    latest: str | Path, model: Any, optimizer: Any, log: Any = print
) -> tuple[dict | None, Path | None]:
    """Load the newest usable checkpoint: ``latest`` (what Ray reports), else the older ones it
    kept, newest first. A half-written or corrupt checkpoint is reported and skipped, not
    trained from. Returns ``(loop state, directory)``, or ``(None, None)`` when none loads.

    Every rank sees the same files and DCP raises on every rank when any rank's read fails,
    so all ranks skip the same checkpoints and agree on the one they resume from.
    """
    for candidate in [Path(latest), *_older_checkpoints(Path(latest))]:
        problem = checkpoint_problem(candidate)
        if problem is None:
            from torch.distributed.checkpoint.api import CheckpointException

            try:
                return load_checkpoint(str(candidate), model, optimizer), candidate
            # torch raises many types for a damaged file; DCP wraps them in a BaseException.
            except (Exception, CheckpointException) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                problem = f"cannot be loaded ({type(err).__name__}: {first[:200]})"
        log(f"[taskray] checkpoint {candidate.name} skipped: {problem}")
    return None, None


def export_bundle(
    directory: str,
    model: Any,
    tokenizer: Any,
    task: Task,
    cfg: WorkerConfig,
    metrics: dict[str, float],
    extra: dict[str, Any],
) -> None:
    """Gather the full (unsharded) weights on every rank and write the bundle from rank 0.

    With LoRA the bundle is the complete adapter (every rank's shards gathered first, so no
    rank-0-only slice), or the base with the adapter merged in when ``lora.merge`` is set.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if world()[0] != 0:
        return
    os.makedirs(directory, exist_ok=True)
    if task.model_kind == VLM:
        from actors.vlm import save_vlm

        save_vlm(directory, model, full)
        tokenizer.save_pretrained(directory)
        write_manifest(directory, task, cfg.base_model, metrics, extra)
        return
    lora = cfg.model.lora
    if lora is not None and lora.merge:
        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir, state_dict=full, safe_serialization=True)
            merged = _merge_adapter(cfg, task, adapter_dir)
        merged.save_pretrained(directory, safe_serialization=True)
        extra = {**extra, "merged_adapter": True}
    else:
        model.save_pretrained(directory, state_dict=full, safe_serialization=True)
        if lora is not None:
            extra = {**extra, "adapter": True}
    tokenizer.save_pretrained(directory)
    write_manifest(directory, task, cfg.base_model, metrics, extra)


def _merge_adapter(cfg: WorkerConfig, task: Task, adapter_dir: str) -> Any:
    from peft import PeftModel

    base_options = cfg.model.model_copy(update={"lora": None, "gradient_checkpointing": False})
    base = build_model(base_options, task.model_kind, task.labels).model
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


# ----- the loop -----------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; see the module docstring."""
    import ray.train
    from ray.train import Checkpoint
    from transformers import get_scheduler

    cfg = WorkerConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    optim = cfg.optim
    torch.manual_seed(optim.seed)
    np.random.seed(optim.seed)
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")

    task = task_from_spec(cfg.task)
    kind = task.model_kind
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    built = build_model(
        cfg.model,
        kind,
        task.labels,
        use_gpu=cfg.use_gpu,
        tokenizer=tokenizer,
        image_token=getattr(task.options, "image_token", "<image>"),
    )
    model = built.model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        say(
            cfg.run_dir,
            f"[taskray] model {cfg.base_model} ({kind}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
            f"{trainable / 1e6:.2f}M trainable), "
            f"attention={built.attn_implementation} ({built.attn_reason}), "
            f"dtype={str(built.dtype).replace('torch.', '')}, workers={size}"
            + (", FSDP2" if size > 1 else ""),
        )
    if size > 1:
        model = shard_model(model, cfg.use_gpu, cfg.model.cpu_offload)
        if kind == VLM:
            from torch.distributed.fsdp import register_fsdp_forward_method

            # generate() reads the root's parameters (vision, projector, embeddings) outside
            # forward(); FSDP must unshard them around it as it does around forward().
            register_fsdp_forward_method(model, "generate")
    model.train()
    optimizer = make_optimizer(model, optim)

    rows_per_worker = cfg.train_rows // size  # Ray's equal split
    micro_per_epoch = max(1, math.ceil(rows_per_worker / optim.batch_size))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / optim.grad_accum))
    total_steps = steps_per_epoch * optim.epochs
    scheduler = get_scheduler(
        optim.scheduler,
        optimizer,
        num_warmup_steps=int(optim.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )

    # The data position: epochs finished and micro-batches of the next one already trained on.
    start_epoch, skip_micro, global_step = 0, 0, 0
    best: float | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        tell = (lambda m: say(cfg.run_dir, m)) if rank == 0 else (lambda m: None)
        with checkpoint.as_directory() as ckpt_dir:
            state, used = restore_checkpoint(ckpt_dir, model, optimizer, tell)
        if state is None:
            tell("[taskray] no usable checkpoint: training from the start")
        else:
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, skip_micro = state["next_epoch"], state["skip_micro_batches"]
            global_step, best = state["global_step"], state["best"]
            where = f"epoch {start_epoch + 1}" + (
                f", after micro-batch {skip_micro}" if skip_micro else ""
            )
            tell(f"[taskray] resumed from {used.name} at {where} (step {global_step})")
            if rank == 0:
                with open(os.path.join(cfg.run_dir, "resumes.jsonl"), "a") as f:
                    f.write(json.dumps({"from": used.name, "step": global_step}) + "\n")

    if rank == 0:
        console_event(
            cfg.run_dir,
            "plan",
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            epochs=optim.epochs,
            start_step=global_step,
        )
    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("validation")
    sink = MetricsSink(cfg.run_dir) if rank == 0 else None
    peak = optim.peak_flops or measure_peak_flops(device)
    token_flops = flops_per_token(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    packed_mask = built.attn_implementation != "flash_attention_2"

    for epoch in range(start_epoch, optim.epochs):
        t_epoch = time.perf_counter()
        running_loss, running_count, tokens, samples = 0.0, 0.0, 0, 0
        t_log = time.perf_counter()
        micro_iter = iter(
            train_shard.iter_batches(
                batch_size=optim.batch_size,
                batch_format="numpy",
                local_shuffle_buffer_size=max(optim.batch_size * 8, 256),
                local_shuffle_seed=optim.seed * 1000 + epoch * size + rank,
            )
        )
        # Resuming mid-epoch: the shard yields the same rows in the same order as before (a
        # materialised, order-preserving dataset split deterministically, seeded local
        # shuffle), so skipping what was trained on lands exactly where the run stopped.
        step_in_epoch = skip_micro // optim.grad_accum
        exhausted = False
        for _ in range(skip_micro):
            if next(micro_iter, None) is None:
                exhausted = True
                break
        skip_micro = 0
        while not exhausted:
            window = []
            for _ in range(optim.grad_accum):
                try:
                    window.append(collate(next(micro_iter), pad_id, device, packed_mask))
                except StopIteration:
                    exhausted = True
                    break
            # Every rank holds the same number of micro-batches (equal split), so all ranks
            # agree on whether this window is empty.
            if not window:
                break
            step_loss, step_count = accumulate(kind, model, window, device)
            for b in window:
                tokens += int((b["input_ids"] != pad_id).sum())
                samples += int(b["input_ids"].shape[0])
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
            running_loss += step_loss
            running_count += step_count
            if global_step % optim.log_every == 0 or exhausted:
                elapsed = time.perf_counter() - t_log
                loss = running_loss / max(running_count, 1.0)
                tok_s = all_sum(tokens, device) / max(elapsed, 1e-9)
                record = {
                    "epoch": epoch + 1,
                    "step": global_step,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": tok_s,
                    "samples_per_s": all_sum(samples, device) / max(elapsed, 1e-9),
                    # Cluster-wide achieved FLOP/s over the sum of the workers' peaks.
                    "mfu": tok_s * token_flops / (peak * size),
                    "peak_memory_mb": peak_memory_mb(device),
                }
                if rank == 0:
                    print(
                        f"[taskray] epoch {epoch + 1}/{optim.epochs} "
                        f"step {step_in_epoch}/{steps_per_epoch} loss {loss:.4f} "
                        f"lr {record['lr']:.2e} {tok_s:,.0f} tok/s mfu {record['mfu']:.1%} "
                        f"mem {record['peak_memory_mb']:,.0f} MiB",
                        flush=True,
                    )
                    sink.write(record, global_step)
                running_loss, running_count, tokens, samples = 0.0, 0.0, 0, 0
                t_log = time.perf_counter()
            every = optim.checkpoint_every
            if (
                every
                and global_step % every == 0
                and not exhausted
                and (step_in_epoch < steps_per_epoch)
            ):
                _report_step_checkpoint(
                    model, optimizer, scheduler, optim, epoch, step_in_epoch, global_step, best
                )

        metrics = evaluate(model, task, val_ds, optim, tokenizer, device)
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
            say(cfg.run_dir, f"[taskray] epoch {epoch + 1} evaluation: {shown}")
            sink.write(metrics, global_step, prefix="eval")

        with tempfile.TemporaryDirectory(prefix="taskray-ckpt-") as tmp:
            state = {
                "next_epoch": epoch + 1,
                "skip_micro_batches": 0,
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
                cfg,
                {k[5:]: v for k, v in metrics.items() if k.startswith("eval_")},
                {"epoch": epoch + 1, "attn_implementation": built.attn_implementation},
            )
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"epoch-{epoch + 1:04d}",
            )


def _report_step_checkpoint(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    optim: OptimOptions,
    epoch: int,
    step_in_epoch: int,
    global_step: int,
    best: float | None,
) -> None:
    """A mid-epoch resume point: model, optimizer, scheduler, RNG and the data position.

    It carries no bundle and no evaluation. When checkpoints are ranked by a metric it reports
    that metric as -inf, so Ray's keep-K drops step checkpoints before epoch ones (whose
    bundles are the candidates for export) while still never deleting the latest.
    """
    import ray.train
    from ray.train import Checkpoint

    metrics: dict[str, Any] = {"epoch": epoch + 1, "step": global_step}
    if optim.select_metric:
        metrics[f"eval_{optim.select_metric}"] = float("-inf")
    with tempfile.TemporaryDirectory(prefix="taskray-ckpt-") as tmp:
        state = {
            "next_epoch": epoch,
            "skip_micro_batches": step_in_epoch * optim.grad_accum,
            "global_step": global_step,
            "best": best,
            "scheduler": scheduler.state_dict(),
        }
        save_checkpoint(tmp, model, optimizer, state)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step-{global_step:07d}",
        )
    if world()[0] == 0:
        print(f"[taskray] checkpoint at step {global_step}", flush=True)
