"""Typed configs of the entry points; each YAML in ``configs/`` mirrors one of these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from actors.config import ModelOptions, OptimOptions, Strict


class ConfigError(ValueError):
    """A config the user wrote that cannot be used; the message is one line saying why."""


class TaskOptions(Strict):
    """Which task family, in which formulation."""

    name: str = Field(description="task family, see `taskray tasks`")
    formulation: str | None = Field(default=None, description="default: the family's first")
    max_length: int = Field(default=256, ge=8)
    labels: list[str] | None = Field(
        default=None, description="closed label set in class-id order; inferred when omitted"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="family options, e.g. doc_stride (see taskray tasks)"
    )


class DataOptions(Strict):
    """Where the rows come from and how bad rows are handled."""

    train: str | list[str] = Field(
        description="JSONL, Parquet or CSV file, a folder of them, or a list of files/folders"
    )
    validation: str | list[str] | None = Field(
        default=None, description="held-out file(s); split from train when omitted"
    )
    id_field: str = Field(
        default="id",
        description="rows that carry this field must have unique values; a repeated id is "
        "rejected (the first occurrence is kept)",
    )
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    split_seed: int = 0
    max_rejected_fraction: float = Field(default=0.01, ge=0, le=1)
    tokenizer_actors: int = Field(default=1, ge=1, description="size of the tokenizer pool")
    packing: bool = Field(
        default=False, description="pack causal-LM training rows into max_length sequences"
    )
    packing_window: int = Field(
        default=2048, ge=2, description="rows considered together by best-fit-decreasing"
    )


class ScalingOptions(Strict):
    """How many Ray Train workers and what each one gets."""

    workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=0, ge=0, description="worker failures to recover from")
    keep_checkpoints: int = Field(
        default=2, ge=1, description="checkpoints kept (best by select_metric, else latest)"
    )


class RayOptions(Strict):
    """The Ray instance: a cluster address, or a local one with these resources."""

    address: str | None = Field(default=None, description="cluster address; RAY_ADDRESS also")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local instance")


class TrainConfig(Strict):
    """`taskray train`: task + model + data + optimisation + scaling → a bundle."""

    task: TaskOptions
    model: ModelOptions
    data: DataOptions
    training: OptimOptions = OptimOptions()
    scaling: ScalingOptions = ScalingOptions()
    ray: RayOptions = RayOptions()
    output_dir: str = Field(
        default="runs/latest",
        description="run dir (a local path or a mount every node shares); bundle at <dir>/bundle",
    )
    resume: bool = Field(default=True, description="resume from the run dir's last checkpoint")

    @field_validator("output_dir")
    @classmethod
    def _filesystem_path(cls, value: str) -> str:
        # The driver and rank 0 write the bundle, metrics and rejected rows with plain file
        # I/O, so an object-store URI would silently become a local folder named "s3:".
        if "://" in value:
            raise ValueError(
                f"'{value}' is a URI; output_dir must be a filesystem path — on a multi-node "
                "cluster, a mount every node shares (NFS, EFS/FSx, Filestore, GCS FUSE), "
                "e.g. /mnt/shared/runs/NAME"
            )
        return value


C = TypeVar("C", bound=BaseModel)


def parse_value(text: str) -> Any:
    """A command-line override's value, read as YAML (so 3 → int, true → bool, [a,b] → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return data


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "could not be parsed"
        raise ConfigError(f"invalid YAML in {p}{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of settings, got {type(data).__name__}")
    return data


def validate_config(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate a dict into a config model; the first problem becomes a one-line error."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
        if first.get("type") == "missing":
            msg = "missing required setting"
        elif first.get("type") == "extra_forbidden":
            msg = "unknown setting (check the spelling)"
        else:
            msg = first.get("msg", "invalid")
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{source}: {loc}: {msg}{more}") from None


def load_config(
    cls: type[C], path: str | os.PathLike[str], overrides: list[str] | None = None
) -> C:
    """Read a YAML config, apply ``key=value`` overrides, validate into ``cls``."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(cls, data, source=str(path))
