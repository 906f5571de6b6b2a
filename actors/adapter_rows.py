"""Each batch row's LoRA adapter in one forward: PEFT's LoRA ``Linear`` layers run every row's own
adapter as two matrix products over all the batch's adapters at once, and PEFT's other layers
get the row names through forward pre-hooks kept registered.

Why by hand: PEFT's mixed-adapter forward (``PeftModel(..., adapter_names=[...])``) is the only
library path, and on every call it walks all of the model's modules twice (to check the names,
then to register a pre-hook on each LoRA layer that passes them on) and removes the hooks
afterwards; then each LoRA layer builds the row-index lists of each adapter in Python, gathers
each adapter's rows, runs its two small linears and scatters them back (about ten operators per
adapter per layer). Multi-LoRA servers (punica, S-LoRA, LoRAX) batch this with their own
kernels; PEFT has none. Here each LoRA ``Linear`` layer computes, for the ``n`` adapters in the
batch (ranks padded to the largest of theirs, scaling folded into B)::

    result = base_layer(x) + ((x @ A_cat.T) * row_mask) @ B_cat

where ``A_cat`` (``n*r`` x in) and ``B_cat`` (``n*r`` x out) stack the adapters' weights
(copies, kept for the last four sets of adapters used), and ``row_mask`` keeps each row's own
adapter's ``r`` columns (zeros for ``"__base__"``), built once per forward. That is three
operators per layer whatever the number of adapters, and it equals each row's adapter applied
alone up to float rounding (the products are summed in another order; tested to 1e-5). On the
engine's small benchmark model a LoRA layer with three adapters in a batch of 16 takes ~40 us
against PEFT's ~150 us. The same operators take one packed row of prompts of several adapters
(``packed()``, a mask per token instead of per row), which PEFT cannot: the engine's packed
prefill then runs newcomers of different adapters together without padding. Layers PEFT must run
itself (DoRA and other variants, a LoRA bias, merged adapters, quantized layers) get the names
through the hooks, as PEFT would, and rule out packing across their adapters (``packs()``). The
names reach only the forwards run by the thread that set them: a call on the same model from
another thread runs as PEFT alone. The stacks follow adapters added, deleted or loaded anew and
a changed scaling (``set_scale``), not a loaded adapter's weights changed in place. No Ray here.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

BASE = "__base__"
# Sets of adapters whose stacked weights are kept, least recently used dropped: each holds a
# copy of its adapters' LoRA weights (a batch's set changes as requests come and go, but over a
# few sets: with adapters a and b, {a}, {b} and {a, b}).
_MAX_SETS = 4


@dataclass
class _Step:
    """The rows of the forwards run inside one ``rows()`` block."""

    thread: int
    names: list[str]  # one per row; for a packed row, one per token
    adapters: tuple[str, ...]  # the batch's adapters, sorted; their slots in the stacks
    slot: list[int]  # each name's slot, -1 for the base
    packed: bool  # one row whose tokens each have a name
    rank: int  # the columns of each slot: the largest rank of these adapters in any layer
    layers: dict[int, tuple[tuple[Any, ...], Any]]  # this set's stacks by layer (``_stacks``)
    masks: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` has the rows (or, packed, the one row of tokens) the names are for."""
        if self.packed:
            return x.dim() == 3 and x.shape[0] == 1 and x.shape[1] == len(self.slot)
        return x.dim() >= 2 and len(x) == len(self.slot)

    def mask(self, like: torch.Tensor, dims: int) -> torch.Tensor:
        """(rows, 1, ..., slots * rank), or packed (1, tokens, slots * rank): 1 on each row's
        (token's) own adapter's columns. Built once per forward, on the device."""
        key = (like.device, like.dtype, dims)
        found = self.masks.get(key)
        if found is None:
            slot = torch.tensor(self.slot, device=like.device)
            column = torch.arange(len(self.adapters) * self.rank, device=like.device) // self.rank
            found = (column[None, :] == slot[:, None]).to(like.dtype)
            n = len(self.slot)
            found = found.view(1, n, -1) if self.packed else found.view(n, *[1] * (dims - 2), -1)
            self.masks[key] = found
        return found


class AdapterRows:
    """Runs each row of a PEFT model's forwards through its own LoRA adapter (see the module
    docstring). ``rows(names)`` sets the rows' adapters for the forwards run inside it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._handles: list[Any] = []
        self._linears: list[torch.nn.Module] = []  # LoRA Linear layers whose forward is ours
        self._hooked: list[torch.nn.Module] = []  # layers PEFT runs, the names given by hooks
        self._packs: dict[frozenset[str], bool] = {}
        self._key: tuple[tuple[str, int], ...] | None = None
        self._configs: tuple[Any, ...] = ()  # held, so that their ids in the key stay theirs
        self._known: set[str] = set()
        self._ranks: dict[str, int] = {}  # each adapter's largest rank in any layer
        self._variant_keys: tuple[str, ...] = ()
        # adapters → layer → (the scalings it was built with, its stacks)
        self._stacks: OrderedDict[tuple[str, ...], dict[int, tuple[tuple[Any, ...], Any]]]
        self._stacks = OrderedDict()
        self._step: _Step | None = None

    def _register(self) -> None:
        """(Re)take the model's LoRA layers when its set of adapters changed: loading an
        adapter with other target modules wraps new layers, and one deleted and loaded anew
        under its name has new weights (and a new config object)."""
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, Linear
        from peft.utils.other import AuxiliaryTrainingWrapper

        key = tuple((name, id(cfg)) for name, cfg in self.model.peft_config.items())
        if key == self._key:
            return
        self.remove()
        known: set[str] = set()
        ranks: dict[str, int] = {}
        for module in self.model.modules():
            if type(module) is Linear:  # exactly: quantized LoRA layers have their own forward
                # An instance attribute: nn.Module.__call__ runs it in place of the class's
                module.forward = functools.partial(self._linear_forward, module)
                self._linears.append(module)
                for name, r in module.r.items():
                    ranks[name] = max(ranks.get(name, 0), r)
            elif isinstance(module, LoraLayer | AuxiliaryTrainingWrapper):
                self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
                self._hooked.append(module)
            if isinstance(module, LoraLayer):
                known |= set(module.lora_A) | set(module.lora_embedding_A)
        self._key, self._known, self._ranks = key, known, ranks
        self._configs = tuple(self.model.peft_config.values())
        self._variant_keys = tuple(VARIANT_KWARG_KEYS)

    def _own(self) -> _Step | None:
        step = self._step
        return step if step is not None and step.thread == threading.get_ident() else None

    def _hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        step = self._own()
        if step is None:
            return None
        if step.packed:  # only where ``packs()`` found none of the adapters here
            if self._holds(module, step.adapters):
                raise ValueError(f"{type(module).__name__} cannot take adapters per token")
            return args, {**kwargs, "adapter_names": [BASE]}
        return args, {**kwargs, "adapter_names": step.names}

    def _linear_forward(
        self, module: Any, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        step = self._own()
        if step is None:
            return type(module).forward(module, x, *args, **kwargs)
        stacks: Any = False
        if not (module.merged or module.disable_adapters or module.training or not step.fits(x)):
            stacks = self._stacked(module, step)
        if stacks is False:  # a layer or call PEFT runs itself (and checks)
            if step.packed:
                raise ValueError("this LoRA layer cannot take adapters per token")
            return type(module).forward(module, x, *args, adapter_names=step.names, **kwargs)
        # what PEFT passes its variants (aLoRA's offsets, set by the model for its active
        # adapter), never the base layer, as PEFT's own forward drops them
        for name in self._variant_keys:
            kwargs.pop(name, None)
        result = module.base_layer(x, *args, **kwargs)
        if stacks is None:  # no adapter of this batch wraps this layer
            return result
        a, b = stacks
        h = torch.matmul(x.to(a.dtype), a.t()) * step.mask(a, x.dim())
        return result + torch.matmul(h, b).to(result.dtype)

    def _stacked(self, module: Any, step: _Step) -> tuple[torch.Tensor, torch.Tensor] | bool | None:
        """(A_cat, B_cat) of this layer for the step's adapters; ``None`` when none of them
        wraps it, ``False`` when one of them needs PEFT's own forward. Rebuilt when a scaling
        changed (``set_scale``), since it is folded into B."""
        scalings = tuple(module.scaling.get(name) for name in step.adapters)
        found = step.layers.get(id(module))
        if found is None or found[0] != scalings:
            found = step.layers[id(module)] = (scalings, self._stack(module, step))
        return found[1]

    def _stack(self, module: Any, step: _Step) -> Any:
        adapters, rank = step.adapters, step.rank
        here = [name for name in adapters if name in module.lora_A]
        if not here:
            return None
        if self._peft_only(module, here):
            return False
        first = module.lora_A[here[0]].weight
        a = first.new_zeros((len(adapters) * rank, module.in_features))
        b = first.new_zeros((len(adapters) * rank, module.out_features))
        with torch.no_grad():
            for slot, name in enumerate(adapters):
                if name not in module.lora_A:
                    continue
                r = module.r[name]
                a[slot * rank : slot * rank + r] = module.lora_A[name].weight
                b[slot * rank : slot * rank + r] = (
                    module.lora_B[name].weight * module.scaling[name]
                ).t()
        return a, b

    @staticmethod
    def _peft_only(module: Any, adapters: Sequence[str]) -> bool:
        """Whether any of these adapters of a LoRA ``Linear`` needs PEFT's own forward."""
        return any(name in module.lora_variant or module.lora_B[name].bias is not None
                   for name in adapters if name in module.lora_A)  # fmt: skip

    @staticmethod
    def _holds(module: Any, adapters: Sequence[str]) -> bool:
        """Whether a layer PEFT runs holds any of these adapters (a layer that cannot say is
        taken to hold them)."""
        available = getattr(module, "_get_available_adapters", None)
        return available is None or any(name in available() for name in adapters)

    def packs(self, adapters: Sequence[str]) -> bool:
        """Whether one packed row may hold tokens of these adapters (``packed()``): every LoRA
        layer holding any of them is one this class runs, with no bias or variant."""
        self._register()
        key = frozenset(a for a in adapters if a != BASE)
        if key not in self._packs:
            self._packs[key] = not any(self._holds(m, key) for m in self._hooked) and not any(
                self._peft_only(m, tuple(key)) for m in self._linears
            )
        return self._packs[key]

    def no_packing(self, adapters: Sequence[str]) -> None:
        """Record that a packed row of these adapters failed: ``packs()`` says no from now on
        (until the model's adapters change)."""
        self._packs[frozenset(a for a in adapters if a != BASE)] = False

    @contextmanager
    def rows(self, names: Sequence[str]) -> Iterator[None]:
        """Forwards run by this thread inside this block apply ``names[i]`` to row ``i``
        (``"__base__"``: no adapter). An adapter no LoRA layer holds is refused, as is a model
        in training mode, as PEFT refuses them."""
        with self._steps(names, packed=False):
            yield

    @contextmanager
    def packed(self, names: Sequence[str]) -> Iterator[None]:
        """Forwards run by this thread inside this block take one row of tokens and apply
        ``names[t]`` to token ``t`` (prompts of several adapters packed back to back). Only
        where ``packs()`` allows it: a layer that cannot raises ``ValueError``."""
        with self._steps(names, packed=True):
            yield

    @contextmanager
    def _steps(self, names: Sequence[str], packed: bool) -> Iterator[None]:
        self._register()
        adapters = tuple(sorted({n for n in names if n != BASE}))
        unknown = set(adapters) - self._known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}"
            )
        if self.model.training:  # PEFT's own rule: dropout would differ by row
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        slot = [adapters.index(n) if n != BASE else -1 for n in names]
        rank = max((self._ranks.get(name, 0) for name in adapters), default=0)
        # this set's stacks, the least recently used set dropped (touched once per forward)
        layers = self._stacks.get(adapters)
        if layers is None:
            while len(self._stacks) >= _MAX_SETS:
                self._stacks.popitem(last=False)
            layers = self._stacks[adapters] = {}
        else:
            self._stacks.move_to_end(adapters)
        self._step = _Step(threading.get_ident(), list(names), adapters, slot, packed, rank, layers)
        try:
            yield
        finally:
            self._step = None

    def remove(self) -> None:
        """Give the model back its own forwards (it may outlive its engine)."""
        for handle in self._handles:
            handle.remove()
        for module in self._linears:
            module.__dict__.pop("forward", None)
        self._handles, self._linears, self._hooked, self._key = [], [], [], None
        self._stacks, self._packs, self._configs = OrderedDict(), {}, ()
