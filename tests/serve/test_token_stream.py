"""How a generator replica turns engine events into stream items (no Ray): the first piece at
once, later pieces joined per interval, the completion and errors at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.generation import Completion
from serve.generator import TokenStream

DONE = Completion(text="abcdef", finish_reason="length", prompt_tokens=3, completion_tokens=6)


async def _read(stream: TokenStream, feed: list[tuple[float, str, object]]) -> list:
    """Feed ``(delay_s, kind, payload)`` events as the engine would, collect the items with
    the time each arrived."""

    async def produce() -> None:
        for delay, kind, payload in feed:
            await asyncio.sleep(delay)
            stream.sink(kind, payload)

    producer = asyncio.create_task(produce())
    start, got = time.monotonic(), []
    try:
        async for item in stream.items():
            got.append((time.monotonic() - start, item))
    finally:
        await producer
    return got


def test_first_piece_at_once_then_joined_per_interval_and_done_at_once_with_held_text():
    async def main() -> list:
        stream = TokenStream(interval_s=0.2)
        feed = [(0.0, "text", "a"), *[(0.02, "text", c) for c in "bcdef"], (0.0, "done", DONE)]
        return await _read(stream, feed)

    got = asyncio.run(main())
    texts = [item["text"] for _, item in got if "text" in item]
    assert texts == ["a", "bcdef"]  # the five later pieces arrived within one interval
    assert got[0][0] < 0.1  # the first piece did not wait
    assert len(got) == 2  # the held text and the completion went as one item
    assert got[-1][1]["done"]["text"] == "abcdef"
    assert got[-1][0] < 0.2  # the completion flushed what was held, without waiting


def test_held_text_goes_out_when_the_interval_ends():
    async def main() -> list:
        stream = TokenStream(interval_s=0.1)
        feed = [(0.0, "text", "a"), (0.01, "text", "b"), (0.3, "done", DONE)]
        return await _read(stream, feed)

    got = asyncio.run(main())
    assert [item.get("text") for _, item in got] == ["a", "b", None]
    assert 0.08 < got[1][0] < 0.25  # "b" waited for the interval, not for the completion
    assert got[2][1]["done"]["finish_reason"] == "length"  # nothing was held: done alone


def test_zero_interval_sends_every_piece_and_errors_are_raised():
    async def main() -> list:
        stream = TokenStream(interval_s=0.0)
        feed = [(0.0, "text", "a"), (0.01, "text", "b"), (0.01, "error", IndexError("boom"))]
        return await _read(stream, feed)

    with pytest.raises(IndexError, match="boom"):
        asyncio.run(main())


def test_text_held_when_an_error_comes_is_sent_before_the_error_is_raised():
    async def main() -> tuple[list, BaseException | None]:
        stream = TokenStream(interval_s=1.0)
        stream.sink("text", "a")
        got: list = []
        items = stream.items()
        got.append(await items.__anext__())
        stream.sink("text", "b")
        stream.sink("error", IndexError("boom"))
        try:
            got.append(await items.__anext__())
            await items.__anext__()
        except IndexError as err:
            return got, err
        return got, None

    got, err = asyncio.run(main())
    assert got == [{"text": "a"}, {"text": "b"}]  # "b" was not lost to the error
    assert isinstance(err, IndexError)


def test_the_interval_is_read_after_each_item():
    """A callable interval (the replica's budget) is asked again after every item sent."""
    asked: list[float] = []

    def interval() -> float:
        asked.append(0.15 if asked else 0.0)  # no hold after "a", then 0.15 s
        return asked[-1]

    async def main() -> list:
        stream = TokenStream(interval_s=interval)
        feed = [(0.0, "text", "a"), (0.02, "text", "b"), (0.05, "text", "c"), (0.3, "done", DONE)]
        return await _read(stream, feed)

    got = asyncio.run(main())
    texts = [item["text"] for _, item in got if "text" in item]
    assert texts == ["a", "b", "c"] or texts == ["a", "bc"]  # "b" was not held
    assert len(asked) == len(texts)
    if texts == ["a", "b", "c"]:
        assert got[2][0] - got[1][0] > 0.12  # "c" waited for the widened interval


@pytest.mark.parametrize(
    ("open_streams", "budget", "expected"),
    [
        (1, 100, 0.05),
        (4, 100, 0.05),
        (16, 100, 0.16),
        (32, 100, 0.32),
        (16, 0, 0.05),
        (1, 40, 0.05),
        (4, 40, 0.1),
        (16, 40, 0.4),  # the default budget
    ],
)
def test_a_replica_widens_each_streams_interval_to_hold_its_message_budget(
    open_streams, budget, expected
):
    """``stream_messages_per_s`` bounds the items a second that all streams send together;
    below the budget every stream keeps ``stream_interval_s``; 0 turns the budget off."""
    from types import SimpleNamespace

    from serve.generator import GeneratorBase

    replica = SimpleNamespace(
        stream_interval_s=0.05, stream_messages_per_s=budget, open_streams=open_streams
    )
    interval = GeneratorBase.stream_interval(replica)
    assert interval == pytest.approx(expected)
    if budget:
        assert open_streams / interval <= budget + 1e-9
