"""Code: ``prompt`` → ``code``; exact match and, where rows carry ``tests``, pass@k measured by
running the code in a throwaway subprocess (time limit, no network, temporary directory)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, ClassVar

from tasks.lm import Text, TextToTextTask
from tasks.metrics import normalize_answer, pass_at_k

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)

# Runs before the candidate code in the child: blocks sockets at the Python level (the
# portable part of "no network"; where `unshare` is usable the child also gets no network
# namespace), caps memory, and hides the environment.
_GUARD = """
import resource, socket
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the taskray code sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
"""


class CodeRow(Text):
    """A task description, its reference solution and optional assert-style tests."""

    prompt: str
    code: str | None = None
    tests: list[str] | None = None


def strip_fences(text: str) -> str:
    """The code inside the first Markdown fence, or the text itself."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def _unshare_prefix() -> list[str]:
    """``unshare`` into a new user+network namespace when this system allows it."""
    exe = shutil.which("unshare")
    if not exe:
        return []
    try:
        done = subprocess.run(
            [exe, "--user", "--map-root-user", "--net", "true"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [exe, "--user", "--map-root-user", "--net"] if done.returncode == 0 else []


def run_tests(
    code: str, tests: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512
) -> bool:
    """Whether ``code`` followed by ``tests`` exits cleanly in the sandbox."""
    program = "\n".join([_GUARD.format(mem=memory_mb * 2**20), code, *tests, ""])
    with tempfile.TemporaryDirectory(prefix="taskray-sandbox-") as workdir:
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-S", path]
        try:
            done = subprocess.run(
                cmd,
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir},
                capture_output=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


class CodeTask(TextToTextTask):
    """Code generation from a description."""

    name: ClassVar[str] = "code"
    description: ClassVar[str] = "description → code (exact match, pass@k with tests)"
    formulations: ClassVar[dict[str, str]] = {"causal": "causal_lm"}
    row_schema: ClassVar[type[CodeRow]] = CodeRow
    target_field: ClassVar[str] = "code"
    prompt_template: ClassVar[str] = "{prompt}\n"
    source_template: ClassVar[str] = "{prompt}"

    def decode(self, outputs: Any, rows: Sequence[dict[str, Any]] | None = None) -> list[dict]:
        """Generated text → ``{"code"}`` (Markdown fences removed)."""
        return [{"code": strip_fences(str(text)).strip("\n")} for text in outputs]

    def metrics(self, predictions: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]):
        """Exact match on whitespace-normalised code; pass@1 (and pass@k when predictions carry
        ``samples``) on rows with tests."""
        if not rows:
            return {"exact_match": 0.0}
        em = sum(
            normalize_answer(p["code"]) == normalize_answer(r["code"])
            for p, r in zip(predictions, rows, strict=True)
        )
        out: dict[str, float] = {"exact_match": em / len(rows)}
        tested = [(p, r) for p, r in zip(predictions, rows, strict=True) if r.get("tests")]
        if tested:
            ks: dict[int, list[float]] = {}
            for pred, row in tested:
                samples = pred.get("samples") or [pred["code"]]
                correct = sum(run_tests(s, row["tests"]) for s in samples)
                for k in {1, len(samples)}:
                    ks.setdefault(k, []).append(pass_at_k(len(samples), correct, k))
            for k, values in sorted(ks.items()):
                out[f"pass@{k}"] = sum(values) / len(values)
        return out
