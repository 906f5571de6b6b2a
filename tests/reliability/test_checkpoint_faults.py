"""Damaged checkpoints: a half-written or corrupt checkpoint is detected and the previous one
used (in one process, the same functions the Ray Train worker calls on resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actors.train_loop import checkpoint_problem, restore_checkpoint, save_checkpoint


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture
def checkpoints(tmp_path):
    """step-3 and step-6 of one run, with the weights each one holds."""
    model = _model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    saved = {}
    for step in (3, 6):
        _step(model, optimizer)
        directory = tmp_path / f"step-{step:07d}"
        directory.mkdir()
        save_checkpoint(str(directory), model, optimizer, {"global_step": step})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return tmp_path, saved


def _restore(latest: Path):
    model = _model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, optimizer)  # optimizer state exists, as in a worker after building
    lines: list[str] = []
    state, used = restore_checkpoint(latest, model, optimizer, lines.append)
    return state, used, model, lines


def _same(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_intact_latest_checkpoint_is_used(checkpoints):
    root, saved = checkpoints
    state, used, model, lines = _restore(root / "step-0000006")
    assert used.name == "step-0000006" and state["global_step"] == 6
    assert _same(model, saved[6]) and not lines


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / ".metadata").unlink(), "half-written"),
        (lambda d: (d / "train_state.json").unlink(), "half-written"),
        (lambda d: (d / "train_state.json").write_text('{"global_st'), "unreadable"),
        (
            lambda d: [f.write_bytes(f.read_bytes()[:40]) for f in d.glob("*.distcp")],
            "cannot be loaded",
        ),
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(checkpoints, damage, reason):
    root, saved = checkpoints
    latest = root / "step-0000006"
    damage(latest)
    assert (checkpoint_problem(latest) is None) == (reason == "cannot be loaded")
    state, used, model, lines = _restore(latest)
    assert used.name == "step-0000003" and state["global_step"] == 3
    assert _same(model, saved[3])  # nothing of the damaged checkpoint stuck
    assert len(lines) == 1 and "step-0000006" in lines[0] and reason in lines[0]


def test_no_usable_checkpoint_is_reported(checkpoints):
    root, _ = checkpoints
    for name in ("step-0000003", "step-0000006"):
        (root / name / ".metadata").unlink()
    state, used, _, lines = _restore(root / "step-0000006")
    assert state is None and used is None
    assert len(lines) == 2
    assert json.loads(json.dumps(lines))  # plain strings, printable as they are
