"""The serve benchmark (``benchmarks/serve_throughput.py``) in rooms, each below the next:

- ``workload``: what is sent (reviews, prompts, adapters, concurrencies, warm-ups);
- ``common``: paths, Ray and Serve start-up, CPU accounting by process, statistics and the
  generator's ratios;
- ``load``: the closed-loop HTTP load generator (classifier requests, streamed completions);
- ``baselines``: the FastAPI + ``transformers`` pipeline server and the in-process generator;
- ``classifier`` and ``generator``: the two halves, each measuring Serve against its baseline;
- ``report``: the tables and the chart;
- ``cli``: the command line that runs the halves and writes the JSON and PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The project's packages (``serve``, ``actors``, ``cluster``, ``tasks``) import from the checkout.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
