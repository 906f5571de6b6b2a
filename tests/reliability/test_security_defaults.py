"""Security defaults, checked without a Ray cluster: bundles load safetensors only and never
run their own code, the pass@k sandbox (time limit, no network, no processes, throwaway
directory), API keys compared in constant time, served names that cannot be paths, Ray token
authentication left on, and no secret in what ``taskray`` prints."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "actors", "serve", "cluster")


# ----- bundles: safetensors only ------------------------------------------------------------
class _Payload:
    """A pickle that creates ``marker`` when it is unpickled: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.mark.parametrize(
    "name",
    ["pytorch_model.bin", "training_args.bin", "model.pt", "optimizer.pth", "extra.PKL",
     "state.pickle", "last.ckpt"],
)  # fmt: skip
def test_a_pickle_file_in_a_bundle_is_refused_and_never_unpickled(tiny_bundle, tmp_path, name):
    from actors.bundle import BundleError, load_bundle

    bundle = _bundle_copy(tiny_bundle, tmp_path)
    marker = tmp_path / "unpickled"
    (bundle / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(BundleError, match=re.escape(name)):
        load_bundle(bundle)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_never_unpickled(tiny_bundle, tmp_path):
    from actors.bundle import load_bundle

    bundle = _bundle_copy(tiny_bundle, tmp_path)
    marker = tmp_path / "unpickled"
    (bundle / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own parse error, whatever its type
        load_bundle(bundle)
    assert not marker.exists()


def test_weights_without_safetensors_are_refused_for_bundles_and_plain_directories(
    tiny_bundle, tmp_path
):
    from actors.bundle import BundleError, load_bundle
    from serve.generator import load_generative

    bundle = _bundle_copy(tiny_bundle, tmp_path)
    (bundle / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"no \.safetensors"):
        load_bundle(bundle)
    # A plain HF directory (what a generator serves) with only a pickle checkpoint.
    (bundle / "taskray.json").unlink()
    (bundle / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "x")))
    with pytest.raises(BundleError, match="pickle"):
        load_generative(str(bundle), None, "cpu")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from tests.conftest import tiny_lm_dir

    return tiny_lm_dir(tmp_path_factory.mktemp("lm"))


def test_a_served_lora_adapter_with_pickle_weights_is_refused(tiny_lm, tmp_path):
    import torch

    from actors.bundle import BundleError
    from serve.generator import generator_class
    from tests.conftest import lora_adapter

    adapter = lora_adapter(tiny_lm, tmp_path / "lora", seed=1)
    from safetensors.torch import load_file

    state = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(state, adapter / "adapter_model.bin")  # what PEFT falls back to
    spec = {"name": "lm", "bundle": str(tiny_lm), "adapters": {"pickled": str(adapter)}}
    with pytest.raises(BundleError, match="pickle"):  # at deploy time or at first use
        replica = generator_class(1).func_or_class(spec)
        replica._load_adapter("pickled")


# ----- trust_remote_code only when set ------------------------------------------------------
def _remote_code_model(tiny_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A bundle whose config names a model class in its own ``evil.py``, which creates
    ``marker`` when imported (and no class transformers knows for its ``model_type``)."""
    directory = _bundle_copy(tiny_bundle, tmp_path)
    marker = tmp_path / "remote-code-ran"
    (directory / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class EvilConfig(BertConfig):\n    model_type = 'taskray-evil'\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "taskray-evil"
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory, marker


@pytest.fixture()
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into its modules cache: keep that in ``tmp_path``. And
    answer "y" to transformers' interactive "run the custom code?" prompt, as a user at a
    terminal might: code that leaves trust_remote_code unset (None) would then run it."""
    import builtins

    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(builtins, "input", lambda *_: "y")


def test_no_code_sets_trust_remote_code_and_every_option_defaults_to_false():
    from actors.config import ModelOptions
    from actors.embedder import EmbedderOptions
    from serve.config import ServedModel

    hits = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"trust_remote_code\s*=\s*True", line)
    ]
    assert not hits
    assert ModelOptions(name_or_path="x").trust_remote_code is False
    assert EmbedderOptions().trust_remote_code is False
    assert "trust_remote_code" not in ServedModel.model_fields  # serving never trusts


def test_a_bundle_with_its_own_code_is_refused_even_if_a_user_says_yes(
    tiny_bundle, tmp_path, modules_cache
):
    from actors.bundle import load_bundle

    directory, marker = _remote_code_model(tiny_bundle, tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_bundle(directory)
    assert not marker.exists()


def test_training_runs_a_models_own_code_only_when_the_config_says_so(
    tiny_bundle, tmp_path, modules_cache
):
    from actors.config import ModelOptions
    from actors.modeling import build_model

    directory, marker = _remote_code_model(tiny_bundle, tmp_path)
    options = ModelOptions(name_or_path=str(directory), init="random")
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(options, "sequence_classification", ["a", "b"])
    assert not marker.exists()
    trusted = options.model_copy(update={"trust_remote_code": True})
    built = build_model(trusted, "sequence_classification", ["a", "b"])
    assert marker.exists() and type(built.model).__name__ == "EvilModel"


def test_a_served_plain_model_directory_with_its_own_code_is_refused(
    tiny_bundle, tmp_path, modules_cache
):
    from serve.generator import load_generative

    directory, marker = _remote_code_model(tiny_bundle, tmp_path)
    (directory / "taskray.json").unlink()  # a plain HF directory, as generators serve
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "evil.EvilModel"
    (directory / "config.json").write_text(json.dumps(config))
    with contextlib.suppress(Exception):  # refused or not, the question is whether it ran
        load_generative(str(directory), None, "cpu")
    assert not marker.exists(), "a served model directory's own code ran"


# ----- the pass@k sandbox -------------------------------------------------------------------
@pytest.fixture(params=["namespace", "guard-only"])
def sandbox(request, monkeypatch):
    """``run_tests`` as it runs here (in a network namespace when ``unshare`` works) and as it
    runs where ``unshare`` is not allowed (containers): the Python-level guard alone."""
    import tasks.code as code

    if request.param == "guard-only":
        monkeypatch.setattr(code, "_unshare_prefix", lambda: [])
    elif not code._unshare_prefix():
        pytest.skip("unshare (user + network namespace) is not allowed on this machine")
    return code.run_tests


@pytest.fixture()
def listener():
    """A TCP server on loopback that records whether anything connected to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    yield server
    server.close()


def _connected(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except TimeoutError:
        return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_sandbox_passes_and_fails_code_as_written(sandbox):
    assert sandbox("def f(x):\n    return x * 2\n", ["assert f(2) == 4"])
    assert not sandbox("def f(x):\n    return x\n", ["assert f(2) == 4"])


def test_sandbox_has_no_network(sandbox, listener):
    port = listener.getsockname()[1]
    attempts = {
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        # The C module under `socket`: a guard that patches only `socket` misses it.
        "_socket": f"import _socket\ns = _socket.socket()\ns.settimeout(2)\n"
        f"s.connect(('127.0.0.1', {port}))",
        # A fresh interpreter without the guard.
        "subprocess": "import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
        f"\"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"], "
        "check=True)",
        "os.system": "import os\nassert os.system(\"python3 -c 'import socket; "
        f'socket.create_connection((\\"127.0.0.1\\", {port}), timeout=2)\'") == 0',
    }
    reached = {}
    for name, program in attempts.items():
        passed = sandbox(program, [], timeout_s=10)
        reached[name] = passed or _connected(listener)
    assert not any(reached.values()), reached


def test_sandbox_time_limit_kills_the_code_and_everything_it_started(sandbox, tmp_path):
    """An endless loop is stopped at the limit. So is a process it forked behind the guard's
    back (through libc): the whole process group goes."""
    t0 = time.monotonic()
    assert not sandbox("while True:\n    pass\n", [], timeout_s=1.0)
    assert time.monotonic() - t0 < 6
    pid_file = tmp_path / "child.pid"
    forks = (
        "import ctypes, os, time\n"
        "if ctypes.CDLL(None).fork() == 0:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"  # (if it survives, it ends by itself rather than spin)
        "while True:\n    pass\n"
    )
    assert not sandbox(forks, [], timeout_s=2.0)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"process {pid} started by sandboxed code outlived it"


def test_sandbox_runs_in_a_throwaway_directory_without_the_callers_environment(
    sandbox, tmp_path, monkeypatch
):
    monkeypatch.setenv("TASKRAY_API_KEY", "sandbox-must-not-see-this")
    report = tmp_path / "report.json"
    program = (
        "import json, os\n"
        "open('scratch.txt', 'w').write('x')\n"
        f"json.dump({{'cwd': os.getcwd(), 'env': sorted(os.environ)}}, open({str(report)!r}, 'w'))"
    )
    assert sandbox(program, [])
    seen = json.loads(report.read_text())
    assert Path(seen["cwd"]).name.startswith("taskray-sandbox-")
    assert not Path(seen["cwd"]).exists()  # removed, with what the code wrote there
    assert "TASKRAY_API_KEY" not in seen["env"]
    assert set(seen["env"]) <= {"PATH", "HOME", "PWD", "LC_CTYPE"}, seen["env"]


def test_sandbox_limits_memory_file_size_processes_and_output(sandbox):
    assert not sandbox("x = bytearray(2 * 1024**3)\n", [], memory_mb=256)
    assert not sandbox("open('big', 'wb').write(b'x' * (200 * 2**20))\n", [])
    victim = subprocess.Popen(["sleep", "30"])  # a process of ours the code tries to kill
    try:
        assert not sandbox(f"import os\nos.kill({victim.pid}, 9)\n", [])
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()
    # Output is discarded, not buffered in this process, however much is printed.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert not sandbox("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", [],
                       timeout_s=2.0)  # fmt: skip
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64, f"this process grew {grown_mb:.0f} MB while the sandbox printed"


# ----- API keys -----------------------------------------------------------------------------
def test_api_key_is_compared_in_constant_time(monkeypatch):
    """Every check goes through ``hmac.compare_digest`` (time independent of where the strings
    differ), on bytes, including non-ASCII tokens; only the exact key passes."""
    import hmac

    from fastapi import HTTPException

    from serve.app import build_ingress
    from serve.config import AppArgs

    ingress = build_ingress(AppArgs(retrieval={})).func_or_class
    key = "k-" + "0123456789abcdef" * 2
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    owner = SimpleNamespace(api_key=key)

    def check(header: str | None) -> bool:
        headers = {} if header is None else {"authorization": header}
        try:
            ingress._auth(owner, SimpleNamespace(headers=headers))
            return True
        except HTTPException as err:
            assert err.status_code == 401 and key not in str(err.detail)
            return False

    tokens = [key, key[:-1] + "0", "0" + key[1:], key + "x", key[:-1], "é" * 5, "x"]
    results = {t: check(f"Bearer {t}") for t in tokens}
    assert results == {t: t == key for t in tokens}
    assert [b for _, b in calls] == [key.encode()] * len(tokens)
    assert all(isinstance(a, bytes) for a, _ in calls)
    assert check(f"bearer {key}")  # the scheme is case-insensitive
    assert not check(None) and not check(key) and not check(f"Basic {key}")


def test_served_model_and_adapter_names_cannot_be_paths(tiny_bundle):
    """Names become request ``model`` values and Serve multiplexing ids: the config refuses
    anything path-like, so no name can walk out of a directory."""
    from pydantic import ValidationError

    from serve.config import AppArgs

    for bad in ("../x", "..", "a/b", "/etc", ".hidden", "a\\b", "a b", "", "x" * 65, "~root"):
        with pytest.raises(ValidationError):
            AppArgs(models=[{"name": bad, "bundle": str(tiny_bundle)}])
        with pytest.raises(ValidationError):
            AppArgs(models=[{"name": "ok", "bundle": str(tiny_bundle),
                             "adapters": {bad: str(tiny_bundle)}}])  # fmt: skip
    AppArgs(models=[{"name": "ok-1.2_b", "bundle": str(tiny_bundle)}])


# ----- Ray token authentication stays on ----------------------------------------------------
def test_connect_leaves_ray_token_authentication_as_ray_sets_it(monkeypatch):
    """``cluster.runtime.connect`` starts a local instance with a plain ``ray.init`` (which in
    Ray 2.60 turns token authentication on when ``RAY_AUTH_MODE`` is unset) and joins a
    cluster without touching authentication: no auth setting, no change to the environment."""
    import ray

    from cluster import runtime

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    env_before = dict(os.environ)
    runtime.connect(None, 2)
    runtime.connect("ray://head:10001")
    assert dict(os.environ) == env_before
    for kwargs in calls:
        assert "_system_config" not in kwargs, kwargs
        assert not any("auth" in k.lower() for k in kwargs), kwargs
    assert "address" not in calls[0] and calls[1]["address"] == "ray://head:10001"


def test_serve_detach_starts_a_head_with_token_authentication(monkeypatch, tmp_path):
    import ray

    from cluster import serving

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh machine: no ~/.ray/auth_token
    attempts = []

    def init(**kwargs):
        attempts.append(kwargs)
        if len(attempts) == 1:
            raise ConnectionError("no cluster")

    started = []

    def run(cmd, **kwargs):
        started.append((cmd, kwargs.get("env")))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(subprocess, "run", run)
    serving.ensure_cluster(2)
    [(cmd, env)] = [s for s in started if "start" in s[0]]
    env = env if env is not None else os.environ
    assert env.get("RAY_AUTH_MODE") == "token", (cmd, env.get("RAY_AUTH_MODE"))


def test_cluster_launcher_nodes_start_with_token_authentication():
    """Every `ray start` of the cluster-launcher YAMLs runs with RAY_AUTH_MODE=token (the
    KubeRay manifests are checked in tests/cluster/test_k8s.py)."""
    for name in ("aws.yaml", "gcp.yaml"):
        config = yaml.safe_load((ROOT / "cluster" / "launcher" / name).read_text())
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in config[key] if "ray start" in c]
            assert starts, (name, key)
            assert all("export RAY_AUTH_MODE=token;" in c for c in starts), (name, key)


# ----- no secret in what taskray prints -----------------------------------------------------
SECRETS = {
    "TASKRAY_API_KEY": "api-key-a1b2c3d4e5",
    "RAY_AUTH_TOKEN": "ray-token-f6g7h8i9",
    "QDRANT_API_KEY": "qdrant-key-j0k1l2m3",
    "HF_TOKEN": "hf_abcdefghijklmn",
}


def test_taskray_info_and_errors_show_no_secret(monkeypatch, capsys):
    from cluster import cli

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", "http://admin:url-password-4n5o@head:8265")
    outputs = []
    for argv in (["info"], ["info", "--json"],
                 ["info", "--address", "ray://ops:url-password-4n5o@head:10001"]):  # fmt: skip
        assert cli.main(argv) == 0
        outputs.append(capsys.readouterr())
    assert "head:8265" in outputs[0].out and "head:10001" in outputs[2].out
    # A one-line error that quotes the address.
    code = cli.main(["jobs", "list", "--address", "http://admin:url-password-4n5o@127.0.0.1:9"])
    outputs.append(capsys.readouterr())
    assert code == 2 and outputs[-1].err.startswith("taskray: error:")
    shown = "".join(o.out + o.err for o in outputs)
    for value in [*SECRETS.values(), "url-password-4n5o"]:
        assert value not in shown, value
