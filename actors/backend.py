"""The attention backend and dtype a model gets on this machine.

``transformers`` raises when ``flash_attention_2`` is requested without a GPU rather than falling
back, so the choice is made here, explicitly, with its reason. Imports only torch: the model
builder (``actors.modeling``) and both bundle readers (``actors.bundle``, ``actors.vlm``) use it.
"""

from __future__ import annotations

import importlib.util

import torch


def choose_attention(requested: str = "auto") -> tuple[str, str]:
    """The attention backend to use and why (transformers raises rather than fall back)."""
    has_cuda = torch.cuda.is_available()
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if has_cuda and has_flash:
            return "flash_attention_2", "CUDA and the flash_attn package are present"
        missing = "no CUDA device" if not has_cuda else "flash_attn is not installed"
        return "sdpa", f"{missing}, so PyTorch SDPA"
    if requested == "flash_attention_2" and not (has_cuda and has_flash):
        raise ValueError(
            "attn_implementation=flash_attention_2 needs a CUDA GPU and the flash_attn package "
            "(pip install 'taskray[gpu]'); use 'auto' to fall back to sdpa"
        )
    return requested, "requested in the config"


def choose_dtype(requested: str = "auto", use_gpu: bool | None = None) -> torch.dtype:
    """``auto`` → bf16 on CUDA devices that support it, fp32 otherwise."""
    if requested != "auto":
        return getattr(torch, requested)
    on_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
