"""Code: ``prompt`` → ``code``; exact match and, where rows carry ``tests``, pass@k measured by
running the code in a throwaway subprocess (time limit, no network, temporary directory)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, ClassVar

from tasks.lm import Text, TextToTextTask
from tasks.metrics import normalize_answer, pass_at_k

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)

# Runs before the candidate code in the child. The network namespace of `unshare` (where the
# system allows it) is the real network barrier; this guard is what holds where it does not
# (e.g. containers whose seccomp profile forbids user namespaces), and defence in depth
# elsewhere. It caps memory and written file size, refuses sockets at both the `socket` and
# the `_socket` level (importing `_socket` directly bypassed a `socket`-only guard), and refuses
# to start or signal processes (a fresh interpreter started by the candidate would have no
# guard at all). It is a guard against accidents and ordinary model-written code, not a jail:
# code that loads libc through ctypes can still get round it, which is why the child also runs
# in its own process group, killed whole when the test ends.
_GUARD = """
import resource, socket, _socket, os, subprocess, _posixsubprocess
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the taskray code sandbox")
def _no_processes(*args, **kwargs):
    raise OSError("starting or signalling processes is disabled in the taskray code sandbox")
for _mod in (socket, _socket):
    for _name in ("socket", "socketpair", "fromfd", "create_connection", "create_server",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _no_network)
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "setpgid",
              "setpgrp", "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle",
              "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
              "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
    if hasattr(os, _name):
        setattr(os, _name, _no_processes)
subprocess.Popen = _no_processes
_posixsubprocess.fork_exec = _no_processes
del _mod, _name
"""
#: Largest file the candidate may write (RLIMIT_FSIZE): a loop filling the disk stops here.
MAX_FILE_BYTES = 64 * 2**20


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
    """Whether ``code`` followed by ``tests`` exits cleanly in the sandbox: a fresh isolated
    interpreter (``-I -S``) in a temporary directory that is deleted afterwards, with no
    environment but ``PATH`` and ``HOME``, no network, ``timeout_s`` of wall time and
    ``memory_mb`` of address space. Its output is discarded, not buffered (code that prints
    in a loop must not fill this process's memory), and its whole process group is killed
    when it ends or times out, so nothing it started outlives the test."""
    program = "\n".join(
        [_GUARD.format(mem=memory_mb * 2**20, fsize=MAX_FILE_BYTES), code, *tests, ""]
    )
    with tempfile.TemporaryDirectory(
        prefix="taskray-sandbox-", ignore_cleanup_errors=True
    ) as workdir:
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-S", path]
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, killed whole below
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's process group (the candidate and anything it started), then reap
    the candidate. The group id is the candidate's pid (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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
