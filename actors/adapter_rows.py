"""Each batch row's LoRA adapter for PEFT's mixed-adapter forward, given to the LoRA layers by
forward pre-hooks that stay registered, instead of passing ``adapter_names`` to each call.

Why by hand: ``PeftModel(..., adapter_names=[...])`` runs PEFT's mixed-adapter forward (each
LoRA layer applies every row's own adapter), but on every call it first walks all of the
model's modules twice (to check the names, then to register a pre-hook on each LoRA layer that
passes them on) and removes the hooks afterwards. On the engine's small benchmark model that
walk is ~1.5 ms of a ~17 ms decode step, and it grows with the model's module count. This
class registers the same pre-hooks once (again only when the model's adapters change, since
loading an adapter with other target modules wraps new layers), checks the names against the
adapters the layers hold, and passes the names only to forwards run by the thread that set
them, so a call on the same model from another thread is untouched. The forward computed is
PEFT's own ``_mixed_batch_forward``. No Ray here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class AdapterRows:
    """Persistent pre-hooks that give PEFT's LoRA layers each row's adapter name (see the
    module docstring). ``rows(names)`` sets them for the forwards run inside it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._handles: list[Any] = []
        self._key: tuple[str, ...] | None = None
        self._known: set[str] = set()
        self._names: tuple[int, list[str]] | None = None  # (thread id, one name per row)

    def _register(self) -> None:
        """(Re)register the hooks on every LoRA layer when the set of adapters changed."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        key = tuple(self.model.peft_config)
        if key == self._key:
            return
        self.remove()
        known: set[str] = set()
        for module in self.model.modules():
            if isinstance(module, LoraLayer | AuxiliaryTrainingWrapper):
                self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
            if isinstance(module, LoraLayer):
                known |= set(module.lora_A) | set(module.lora_embedding_A)
        self._key, self._known = key, known

    def _hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        owner = self._names
        if owner is None or owner[0] != threading.get_ident():
            return None
        return args, {**kwargs, "adapter_names": owner[1]}

    @contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Forwards run by this thread inside this block apply ``names[i]`` to row ``i``
        (``"__base__"``: no adapter). An adapter no LoRA layer holds is refused, as PEFT
        refuses it."""
        self._register()
        unknown = {n for n in names if n != "__base__"} - self._known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}"
            )
        self._names = (threading.get_ident(), list(names))
        try:
            yield
        finally:
            self._names = None

    def remove(self) -> None:
        """Take the hooks off the model (it may outlive its engine)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._key = [], None
