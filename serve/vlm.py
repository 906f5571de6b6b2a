"""The vision-language deployment: a multimodal bundle (timm tower + projector + LM) answering
one prompt about one image per request, with concurrent requests batched into one ``generate``.

Images reach it as bytes the ingress has already checked (size, format, pixel count); the
replica decodes them again with the same checks, so a handle caller that skips the ingress gets
the same refusals (as ``ValueError``) and cannot feed it something harmful.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

from ray import serve

from serve.config import ServedModel, replica_device


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class VisionLanguage:
    """Image + prompt → answer, from a multimodal bundle."""

    def __init__(self, spec: dict[str, Any], max_image_bytes: int, max_image_pixels: int) -> None:

        from actors.vlm import load_vlm

        self.spec = ServedModel.model_validate(spec)
        device = replica_device(self.spec)
        self.loaded = load_vlm(self.spec.bundle, device=device)
        self.limits = {"max_bytes": max_image_bytes, "max_pixels": max_image_pixels}
        self.defaults = self.spec.generation
        self.lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()
        self.answer_batch.set_max_batch_size(self.spec.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of this model."""
        return {"id": self.spec.name, "task": "multimodal", "adapters": []}

    def ready(self) -> bool:
        """The replica exists only once its model is loaded."""
        return True

    def stats(self) -> dict[str, Any]:
        """Batch sizes run (for tests and tuning)."""
        return {"batch_sizes": dict(self.batch_sizes)}

    def check_health(self) -> None:
        """Serve's periodic probe."""
        if self.loaded is None:
            raise RuntimeError("model not loaded")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Hot settings from the Serve config's ``user_config``: batching and defaults."""
        if "max_batch_size" in user_config:
            self.answer_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.answer_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        if "generation" in user_config:
            self.defaults = self.defaults.model_copy(update=user_config["generation"])

    async def answer(self, image: bytes, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        """One image + prompt → ``{"text", "prompt_tokens", "completion_tokens"}``."""
        from tasks.multimodal import load_image

        try:
            picture = load_image(image, **self.limits)
            # Checked here, alone: a prompt that cannot be encoded must fail its own request,
            # not the batch it would have joined.
            self.loaded.task.encode_prompt({"prompt": prompt}, self.loaded.tokenizer)
        except ValueError as err:  # RowError: "image: is corrupt ...", "prompt: ..."
            raise ValueError(str(err)) from None
        keys = ("max_new_tokens", "temperature", "top_p", "seed")
        frozen = tuple((k, params.get(k)) for k in keys)
        result = await self.answer_batch((picture, prompt, frozen))
        if isinstance(result, Exception):  # this request's own failure (see answer_batch)
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def answer_batch(self, items: list[tuple[Any, str, tuple]]) -> list[dict[str, Any]]:
        """Batched: requests with equal generation settings share one ``generate`` call."""
        from actors.vlm import answer

        self.batch_sizes[len(items)] += 1
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, params) in enumerate(items):
            groups.setdefault(params, []).append(i)
        out: list[Any] = [None] * len(items)

        def work() -> None:
            from serve.batching import isolate_failures

            with self.lock:
                for params, idx in groups.items():
                    settings = {k: v for k, v in params if v is not None}
                    settings.setdefault("max_new_tokens", self.defaults.max_new_tokens)
                    done = isolate_failures(
                        lambda chunk, s=settings: answer(
                            self.loaded, [c[0] for c in chunk], [c[1] for c in chunk], **s
                        ),
                        [items[i] for i in idx],
                    )
                    for i, result in zip(idx, done, strict=True):
                        out[i] = result

        await asyncio.to_thread(work)
        return out
