"""Keeping one request's failure out of the batch it was run in."""

from __future__ import annotations

from typing import Any


def isolate_failures(run: Any, items: list[Any]) -> list[Any]:
    """``run(items)`` (one batched forward); if it raises, each item alone, so that an input
    that makes the model fail fails only its own request: the result holds that item's
    exception in its place. The replica lives on either way."""
    try:
        return list(run(items))
    except Exception as err:
        if len(items) == 1:
            return [err]
    out: list[Any] = []
    for item in items:
        try:
            out.extend(run([item]))
        except Exception as err:
            out.append(err)
    return out
