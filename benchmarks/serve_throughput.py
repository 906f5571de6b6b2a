"""Serving throughput on this machine, in two sections. Classifier: taskray's batched Ray Serve
deployment vs the same deployment without batching vs a plain FastAPI + uvicorn server around a
`transformers` pipeline, for the MiniLM sentiment classifier: requests/s and p50/p99 latency at
a closed-loop concurrency of 1, 8 and 32 over HTTP on loopback. Generator: a tiny causal LM
streamed over server-sent events from ``/v1/completions`` (continuous batching) vs
``model.generate`` in-process: time to first token and tokens/s at a concurrency of 1, 4, 8 and
16, and a mixed load (streamed and not, two LoRA adapters, two lengths) at 16.

    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py          # a few minutes
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --smoke  # what CI runs
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --bundle PATH  # trained
    flock /tmp/taskray-ray.lock python benchmarks/serve_throughput.py --only generator

(Only one Ray cluster may run on the machine at a time, hence the shared lock. ``--only
classifier|generator`` runs one section and keeps the other's figures from the existing
results file, marking them under ``kept_from_earlier_run``.)

How each half is measured is written at the top of its module: ``serve_bench/classifier.py``
(three systems, one review per request, where the CPU time goes) and
``serve_bench/generator.py`` (Serve streaming against in-process ``generate`` and taskray's
engine, the mixed load, how tokens are counted). ``serve_bench/__init__.py`` lists the rest:
the workload, the load generator, the baselines, the report.

Prints tables and writes benchmarks/results/serve_throughput[-smoke].{json,png} (the generator's
figures under ``"generator"``, its chart in the bottom row). Every ratio is between figures
measured in this invocation.
"""

from __future__ import annotations

from serve_bench.cli import main  # benchmarks/serve_bench/, beside this file

if __name__ == "__main__":
    main(description=__doc__.splitlines()[0])
