"""The Ray Train driver behind ``taskray train``."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.modeling import resolve_model_path
from actors.train_loop import WorkerConfig, train_loop_per_worker
from cluster.config import ConfigError, TrainConfig
from cluster.console import TrainingConsole
from cluster.data import prepare_datasets, resolve_paths
from cluster.runtime import connect
from tasks import get_task


def check_model_source(name: str, tokenizer_path: str, trust_remote_code: bool) -> None:
    """Fail before Ray starts when the model or tokenizer cannot be found."""
    from actors.preprocess import load_tokenizer

    try:
        load_tokenizer(tokenizer_path, trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model '{name}' could not be loaded from a local path or the HF cache ({first}); "
            "pass an existing directory or a model name available offline"
        ) from None


def prepare_multimodal(
    cfg: TrainConfig, task: Any, tokenizer_path: str, run_dir: Path, progress: Any = print
) -> tuple[str, dict[str, Any]]:
    """Vision settings for a multimodal run, fixed before preprocessing: the tokenizer (given
    the image placeholder token when it lacks one, saved in the run dir) and the image
    transform; the task's ``num_image_tokens`` is set to what the vision tower emits.

    Returns the tokenizer path to use and the ``image_config`` for ``TokenizeRows``.
    """
    from actors.preprocess import load_tokenizer
    from actors.vlm import VLM_CONFIG, describe_tower, is_vlm_bundle

    source = resolve_model_path(cfg.model.name_or_path)
    vision = cfg.model.vision
    if is_vlm_bundle(source):
        info = json.loads((Path(source) / VLM_CONFIG).read_text())
    elif vision is None or vision.name is None:
        raise ConfigError(
            "the multimodal task needs model.vision.name (a timm model, e.g. "
            "vit_base_patch16_clip_224) unless model.name_or_path is a multimodal bundle"
        )
    else:
        try:
            info = describe_tower(
                vision.name, vision.kwargs, vision.image_size, vision.feature_layer
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
    wanted = cfg.task.options.get("num_image_tokens")
    if wanted is not None and wanted != info["num_image_tokens"]:
        raise ConfigError(
            f"task.options.num_image_tokens={wanted} but the vision tower emits "
            f"{info['num_image_tokens']} visual tokens; drop the option (it is set for you)"
        )
    task.options.num_image_tokens = info["num_image_tokens"]
    token = task.options.image_token
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        tokenizer_path = str(run_dir / "tokenizer")
        tokenizer.save_pretrained(tokenizer_path)
        progress(f"[taskray] added the image token {token} to the tokenizer ({tokenizer_path})")
    progress(
        f"[taskray] vision: {info['num_image_tokens']} visual tokens per image, input "
        f"{'x'.join(str(d) for d in info['data_config']['input_size'][1:])}"
    )
    return tokenizer_path, {"data_config": info["data_config"]}


def pad_to_workers(train: Any, rows: int, workers: int) -> tuple[Any, int]:
    """The training set with its first rows repeated up to a multiple of ``workers``.

    Ray Train splits it with ``streaming_split(equal=True)``, which drops the remainder so
    that every worker runs the same number of steps (FSDP needs them in lockstep); with a
    deterministic row order those would be the same rows every epoch — never trained on.
    Repeating a few rows instead keeps every row in the run.
    """
    extra = -rows % workers
    if extra == 0:
        return train, rows
    return train.union(train.limit(extra)).materialize(), rows + extra


class TrainingError(RuntimeError):
    """Training did not produce a bundle; the message says why."""


@dataclass
class TrainOutcome:
    """What a finished run produced."""

    bundle: str
    metrics: dict[str, Any]
    counts: dict[str, int]
    seconds: dict[str, float]


def run_training(cfg: TrainConfig, progress: Any = print) -> TrainOutcome:
    """Preprocess with Ray Data, fine-tune with Ray Train, export the bundle to the run dir."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    run_dir = Path(cfg.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        for stale in ("ray", "metrics.jsonl", "resumes.jsonl", "console.jsonl"):
            target = run_dir / stale
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    task = get_task(
        cfg.task.name,
        formulation=cfg.task.formulation,
        max_length=cfg.task.max_length,
        labels=cfg.task.labels,
        options=cfg.task.options,
    )
    if cfg.model.lora is not None and cfg.model.init == "random":
        raise ConfigError(
            "model.lora trains adapters over pretrained weights; set model.init: pretrained "
            "(a random base could not be rebuilt when the adapter is loaded)"
        )
    tokenizer_path = resolve_model_path(cfg.model.tokenizer or cfg.model.name_or_path)
    check_model_source(cfg.model.name_or_path, tokenizer_path, cfg.model.trust_remote_code)
    resolve_paths(cfg.data.train, "train")
    if cfg.data.validation:
        resolve_paths(cfg.data.validation, "validation")
    image_config = None
    if task.model_kind == "vision_causal_lm":
        tokenizer_path, image_config = prepare_multimodal(
            cfg, task, tokenizer_path, run_dir, progress
        )
    elif cfg.model.vision is not None:
        raise ConfigError(f"model.vision is for the multimodal task, not '{task.name}'")
    connect(cfg.ray.address, cfg.ray.num_cpus)
    data = prepare_datasets(
        task,
        cfg.data,
        tokenizer_path,
        run_dir,
        cfg.model.trust_remote_code,
        progress,
        image_config=image_config,
    )
    t_data = time.perf_counter()

    train_ds, train_rows = pad_to_workers(data.train, data.counts["train"], cfg.scaling.workers)
    if train_rows != data.counts["train"]:
        progress(
            f"[taskray] repeated {train_rows - data.counts['train']} training row(s) so that "
            f"{cfg.scaling.workers} workers get equal shares and no row is left out"
        )
    worker_cfg = WorkerConfig(
        task=task.spec(),
        model=cfg.model.model_copy(
            update={"name_or_path": resolve_model_path(cfg.model.name_or_path)}
        ),
        base_model=cfg.model.name_or_path,
        optim=cfg.training,
        tokenizer_path=tokenizer_path,
        train_rows=train_rows,
        run_dir=str(run_dir),
        use_gpu=cfg.scaling.use_gpu,
    )
    select = cfg.training.select_metric
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_cfg.model_dump(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.scaling.keep_checkpoints,
                checkpoint_score_attribute=f"eval_{select}" if select else None,
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        ),
        datasets={"train": train_ds, "validation": data.validation},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    with TrainingConsole(run_dir):
        result = trainer.fit()
    t_train = time.perf_counter()
    if result.error is not None:
        raise TrainingError(f"training failed: {result.error}")

    checkpoint = result.checkpoint
    if select:
        # Ray raises when no reported metrics carry the attribute; keep the last then.
        with contextlib.suppress(ValueError, RuntimeError):
            checkpoint = result.get_best_checkpoint(f"eval_{select}", "max") or checkpoint
    if checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    bundle = run_dir / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    with checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "bundle", bundle)
    manifest = json.loads((bundle / "taskray.json").read_text())
    seconds = {
        "preprocess": t_data - t0,
        "train": t_train - t_data,
        "total": time.perf_counter() - t0,
    }
    summary = {
        "bundle": str(bundle),
        "metrics": manifest.get("metrics", {}),
        "epoch": manifest.get("epoch"),
        "counts": data.counts,
        "seconds": seconds,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainOutcome(str(bundle), manifest.get("metrics", {}), data.counts, seconds)
