"""One request's failure stays out of the batch it was run in."""

from __future__ import annotations

from serve.batching import isolate_failures


def test_a_failing_item_fails_alone_and_the_rest_are_answered():
    calls = []

    def run(items):
        calls.append(list(items))
        if "boom" in items:
            raise IndexError("index out of range in self")
        return [x.upper() for x in items]

    out = isolate_failures(run, ["a", "boom", "c"])
    assert out[0] == "A" and out[2] == "C"
    assert isinstance(out[1], IndexError)
    assert calls == [["a", "boom", "c"], ["a"], ["boom"], ["c"]]  # one batch, then one by one
    assert isolate_failures(run, ["x", "y"]) == ["X", "Y"]
    assert len(calls) == 5  # a healthy batch runs once
    (alone,) = isolate_failures(run, ["boom"])
    assert isinstance(alone, IndexError)
