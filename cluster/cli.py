"""The ``taskray`` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cluster.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_CONFIG = PROJECT_ROOT / "configs" / "classification-minilm.yaml"
QUICKSTART_TEST = PROJECT_ROOT / "data" / "sentiment" / "test.jsonl"
QUICKSTART_VLM_CONFIG = PROJECT_ROOT / "configs" / "multimodal.yaml"
QUICKSTART_LM_CONFIG = PROJECT_ROOT / "configs" / "generation.yaml"
QUICKSTART_PROMPT = "Give a quick tip for keeping cut basil fresh."
QUICKSTART_SENTENCES = [
    "Absolutely loved it: setup took two minutes and it has worked flawlessly since.",
    "The strap snapped on the first day and support never answered my emails.",
    "Not bad at all, the pasta was fresh and the staff were lovely.",
    "I wanted to like this app, but it crashes every time I open the camera.",
]


# ----- secrets in what the CLI prints -------------------------------------------------------
#: Environment variables whose values are secrets wherever they turn up (plus any variable
#: named like one: ..._KEY, ..._TOKEN, ..._SECRET, ..._PASSWORD).
SECRET_ENV = ("TASKRAY_API_KEY", "RAY_AUTH_TOKEN", "QDRANT_API_KEY")
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def redact(text: str) -> str:
    """``text`` with secrets masked, for anything the CLI prints (``taskray info``, errors):
    the user-info part of URLs (``http://user:pass@head`` → ``http://***@head``; Ray and
    job-server addresses may carry credentials) and the values of secret environment
    variables (``SECRET_ENV`` and names ending in KEY/TOKEN/SECRET/PASSWORD, values of 8+
    characters, so short flags are not masked everywhere)."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    for name, value in os.environ.items():
        if (name in SECRET_ENV or _SECRET_NAME.search(name)) and len(value.strip()) >= 8:
            text = text.replace(value.strip(), "***")
    return text


def _user_errors() -> tuple[type[BaseException], ...]:
    from actors.bundle import BundleError
    from cluster.config import ConfigError
    from cluster.data import DataError
    from cluster.runtime import ClusterUnavailable
    from cluster.serving import DeployFailed
    from tasks import TaskError

    return (UserError, ConfigError, DataError, TaskError, BundleError, FileNotFoundError,
            ClusterUnavailable, DeployFailed)  # fmt: skip


# ----- info ---------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Versions, devices, the attention backend and dtype a model would get, the Ray address."""
    from importlib import metadata

    import torch

    from actors.modeling import choose_attention, choose_dtype
    from cluster.runtime import ray_address

    versions = {}
    for name in ("taskray", "ray", "torch", "transformers", "peft", "timm", "qdrant-client"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    devices = ["cpu"] + [
        f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())
    ]
    attn, reason = choose_attention("auto")
    info = {
        "versions": versions,
        "devices": devices,
        "attention": attn,
        "attention_reason": reason,
        "dtype": str(choose_dtype("auto")).replace("torch.", ""),
        "ray_address": redact(
            ray_address(args.address) or "local (a new instance on this machine)"
        ),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for name, version in versions.items():
        print(f"{name:<14} {version}")
    print(f"{'devices':<14} {', '.join(devices)}")
    print(f"{'attention':<14} {attn} ({reason})")
    print(f"{'dtype':<14} {info['dtype']}")
    print(f"{'ray address':<14} {info['ray_address']}")
    return 0


# ----- tasks --------------------------------------------------------------------------------
def cmd_tasks(args: argparse.Namespace) -> int:
    """List the task families with their formulations and row schema."""
    from tasks import TASKS

    described = [cls.describe() for cls in TASKS.values()]
    if args.json:
        print(json.dumps(described, indent=2))
        return 0
    for d in described:
        forms = ", ".join(f"{f} ({k})" for f, k in d["formulations"].items())
        fields = ", ".join(
            f"{n}{'' if s['required'] else '?'}: {s['type']}" for n, s in d["row_schema"].items()
        )
        print(f"{d['name']:<16} {d['description']}")
        print(f"{'':<16} formulations: {forms}")
        print(f"{'':<16} row: {{{fields}}}")
    return 0


# ----- train --------------------------------------------------------------------------------
def _train_config(args: argparse.Namespace) -> Any:
    from cluster.config import TrainConfig, apply_overrides, read_yaml, validate_config

    data = read_yaml(args.config)
    flags = {
        "data.train": args.train,
        "data.validation": args.validation,
        "model.name_or_path": args.model,
        "output_dir": args.output,
        "scaling.workers": args.workers,
        "training.epochs": args.epochs,
        "ray.address": args.address,
    }
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    return validate_config(TrainConfig, apply_overrides(data, overrides), source=args.config)


def cmd_train(args: argparse.Namespace) -> int:
    """Preprocess, fine-tune and export a bundle."""
    from cluster.train import run_training

    cfg = _train_config(args)
    outcome = run_training(cfg)
    print(f"[taskray] bundle: {outcome.bundle}")
    _print_metrics(outcome.metrics)
    print(
        f"[taskray] preprocess {outcome.seconds['preprocess']:.1f}s, "
        f"train {outcome.seconds['train']:.1f}s"
    )
    return 0


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max((len(k) for k in metrics), default=6)
    print(f"{'metric':<{width}}  value")
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) and key != "count" else f"{value:g}"
        print(f"{key:<{width}}  {shown}")


# ----- evaluate -----------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    """A bundle's task metrics on a labelled file."""
    from cluster.evaluate import evaluate_bundle

    try:
        report = evaluate_bundle(
            args.bundle,
            args.data,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            predictions_path=args.predictions,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.predictions:
        report["predictions"] = str(args.predictions)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"task {report['task']}, {report['rows']} rows ({len(report['rejected'])} rejected)")
    _print_metrics(report["metrics"])
    if args.predictions:
        print(f"predictions: {args.predictions}")
    return 0


# ----- serve --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Deploy a Serve config; foreground by default, ``--detach`` to return, ``--stop``.

    In the foreground, SIGTERM and SIGINT drain: new requests get 503, the ones in flight get
    ``--grace-period`` seconds to finish, then Serve and the local Ray instance shut down and
    the command exits 0. A second signal exits at once.
    """
    from cluster import lifecycle, serving

    if args.stop:
        if serving.stop_detached(args.address):
            print("[taskray] Serve shut down on the running cluster")
            return 0
        raise UserError("no running Ray cluster found to stop Serve on")
    if not args.config:
        raise UserError("give a serve config file (e.g. configs/serve.yaml) or --stop")
    config = serving.load_serve_config(args.config, port=args.port)
    url = serving.base_url(config)
    if args.detach:
        serving.ensure_cluster(args.num_cpus)
    else:
        from cluster.runtime import connect

        connect(args.address, args.num_cpus)
    import ray
    from ray import serve

    ready = False
    try:
        serving.deploy(config)
        seconds = serving.wait_ready(url, timeout_s=args.timeout)
        ready = True
        print(
            f"[taskray] serving at {url} (ready in {seconds:.1f}s); OpenAPI at {url}/docs",
            flush=True,
        )
        if args.detach:
            print("[taskray] detached; stop with `taskray serve --stop`")
            return 0
        print("[taskray] Ctrl-C or SIGTERM to stop", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # lifecycle.Terminated (SIGTERM) is one too
        signal_name = "SIGTERM" if lifecycle.received() == signal.SIGTERM else "SIGINT"
        print(f"\n[taskray] {signal_name}: shutting down", flush=True)
        if ready:
            left = serving.drain(args.grace_period)
            print(
                "[taskray] in-flight requests finished"
                if not left
                else f"[taskray] grace period over with {left} request(s) still in flight",
                flush=True,
            )
    finally:
        # Foreground mode owns the app and, without --address, the local Ray instance.
        if not args.detach:
            serve.shutdown()
            ray.shutdown()
            print("[taskray] stopped", flush=True)
    return 0


# ----- quickstart ---------------------------------------------------------------------------
def _shapes_module() -> Any:
    """The synthetic shapes generator (``data/fixtures/make_shapes.py``), imported by path."""
    import importlib.util

    path = PROJECT_ROOT / "data" / "fixtures" / "make_shapes.py"
    spec = importlib.util.spec_from_file_location("make_shapes", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


ADAPTER_STYLES = {"pirate": " Arr, a fine question, matey!", "robot": " Beep boop. Request noted."}
"""The quickstart's two LoRA adapters and the reply each one learns to give."""


def _quickstart_adapters(out: Path) -> tuple[str, dict[str, str]]:
    """A tiny llama base (random weights, saved as a plain HF model directory) and two LoRA
    adapters trained over it through ``taskray train``, each answering in its own style."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.tiny import tiny_model_path
    from cluster.config import TrainConfig, apply_overrides, read_yaml, validate_config
    from cluster.train import run_training

    base = out / "lm-base"
    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(base)
    fixture = PROJECT_ROOT / "data" / "fixtures" / "generation.jsonl"
    prompts = [json.loads(line)["prompt"] for line in fixture.open()]
    adapters = {}
    for style, reply in ADAPTER_STYLES.items():
        rows = out / f"{style}.jsonl"
        rows.write_text(
            "".join(json.dumps({"prompt": p, "completion": reply}) + "\n" for p in prompts)
        )
        raw = apply_overrides(
            read_yaml(QUICKSTART_LM_CONFIG),
            [
                f"model.name_or_path={base}",
                "model.init=pretrained",
                f"data.train={rows}",
                f"output_dir={out / style}",
                "resume=false",
                "training.epochs=6",
                "training.lr=1e-2",
                "training.log_every=10",
                "training.eval_generate_rows=2",
                "training.eval_max_new_tokens=12",
            ],
        )
        raw["model"]["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
        cfg = validate_config(TrainConfig, raw, source=str(QUICKSTART_LM_CONFIG))
        adapters[style] = run_training(cfg, progress=lambda *_: None).bundle
    return str(base), adapters


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Train → evaluate → serve → query: a sentiment classifier on the reviews that ship with
    taskray, and a tiny vision-language model on synthetic shapes, served side by side."""
    import yaml

    from cluster import serving
    from cluster.config import TrainConfig, apply_overrides, read_yaml, validate_config
    from cluster.evaluate import evaluate_bundle
    from cluster.train import run_training
    from serve.client import Client

    times: dict[str, float] = {}
    t_all = time.perf_counter()
    out = Path(args.output).resolve()
    data = read_yaml(QUICKSTART_CONFIG)
    data["data"]["train"] = str(PROJECT_ROOT / data["data"]["train"])
    data["output_dir"] = str(out)
    data["resume"] = False
    cfg = validate_config(TrainConfig, data, source=str(QUICKSTART_CONFIG))

    print(f"[taskray] 1/5 training {cfg.model.name_or_path} on {cfg.data.train}")
    t = time.perf_counter()
    outcome = run_training(cfg)
    times["train classifier"] = time.perf_counter() - t

    print(f"[taskray] 2/5 evaluating the bundle on held-out {QUICKSTART_TEST}")
    t = time.perf_counter()
    report = evaluate_bundle(
        outcome.bundle, str(QUICKSTART_TEST), predictions_path=out / "predictions.jsonl"
    )
    times["evaluate classifier"] = time.perf_counter() - t
    accuracy = report["metrics"]["accuracy"]

    vlm_bundle, questions = None, []
    if args.vlm:
        print("[taskray] 3/5 training a tiny vision-language model on synthetic shapes")
        t = time.perf_counter()
        shapes = out / "shapes"
        _shapes_module().write_dataset(shapes, images=600, seed=11, max_shapes=1, kinds="colour")
        vlm_data = apply_overrides(
            read_yaml(QUICKSTART_VLM_CONFIG),
            [
                f"data.train={shapes / 'train.jsonl'}",
                f"data.validation={shapes / 'validation.jsonl'}",
                f"output_dir={out / 'multimodal'}",
                "resume=false",
                "training.batch_size=8",
                "training.eval_generate_rows=32",
            ],
        )
        vlm_cfg = validate_config(TrainConfig, vlm_data, source=str(QUICKSTART_VLM_CONFIG))
        vlm_bundle = run_training(vlm_cfg).bundle
        questions = [json.loads(line) for line in (shapes / "validation.jsonl").open()][:4]
        times["train VLM"] = time.perf_counter() - t

    base, adapters = None, {}
    if args.adapters:
        print("[taskray] 3b/5 training two LoRA adapters over a tiny llama (one per style)")
        t = time.perf_counter()
        base, adapters = _quickstart_adapters(out)
        times["train 2 LoRA adapters"] = time.perf_counter() - t

    print("[taskray] 4/5 deploying the bundles on Ray Serve")
    t = time.perf_counter()
    serve_cfg = yaml.safe_load((PROJECT_ROOT / "configs" / "serve.yaml").read_text())
    app_args = serve_cfg["applications"][0]["args"]
    app_args["models"][0]["bundle"] = outcome.bundle
    app_args["api_key_env"] = None
    if vlm_bundle is not None:
        app_args["models"].append(
            {
                "name": "shapes-vlm",
                "bundle": vlm_bundle,
                "num_cpus": 0.25,
                "generation": {"max_new_tokens": 8},
            }
        )
    if base is not None:
        app_args["models"].append(
            {
                "name": "tiny-lm",
                "bundle": base,
                "num_cpus": 0.25,
                "adapters": adapters,
                "max_adapters": 2,
                "generation": {"max_new_tokens": 12},
            }
        )
    serve_file = out / "serve.yaml"
    serve_file.write_text(yaml.safe_dump(serve_cfg, sort_keys=False))
    config = serving.load_serve_config(str(serve_file), port=args.port)
    url = serving.base_url(config)
    from ray import serve

    answers: list[str] = []
    styled: dict[str, str] = {}
    try:
        serving.deploy(config)
        serving.wait_ready(url)
        times["deploy on Ray Serve"] = time.perf_counter() - t

        print(f"[taskray] 5/5 querying through the Python client at {url}")
        t = time.perf_counter()
        with Client(url) as client:
            predictions = client.classify(QUICKSTART_SENTENCES)
            for q in questions:
                image = out / "shapes" / q["image"]
                answers.append(client.vlm(image, q["prompt"], model="shapes-vlm")["text"])
            styled = {
                name: client.task("generation", {"prompt": QUICKSTART_PROMPT}, model=name)["text"]
                for name in ([*adapters, "tiny-lm"] if base is not None else [])
            }
        times["query via client"] = time.perf_counter() - t
    finally:
        serve.shutdown()

    print()
    for sentence, pred in zip(QUICKSTART_SENTENCES, predictions, strict=True):
        print(f"  {pred.label:<9} {pred.score:.3f}  {sentence}")
    print()
    print(
        f"held-out accuracy: {accuracy:.3f} on {report['rows']} reviews never trained on "
        f"(macro-F1 {report['metrics']['macro_f1']:.3f})"
    )
    if questions:
        print()
        for q, said in zip(questions, answers, strict=True):
            mark = "✓" if said == q["answer"] else "✗"
            print(f"  {mark} {q['image']}: {q['prompt']} → {said!r} (truth: {q['answer']})")
    if styled:
        print(f"\n  one base, adapters switched per request — {QUICKSTART_PROMPT!r}:")
        for name, text in styled.items():
            role = "base, no adapter" if name == "tiny-lm" else "LoRA adapter"
            print(f"    {name:<8} ({role}): {text!r}")
    print()
    times["total"] = time.perf_counter() - t_all
    for stage, seconds in times.items():
        print(f"  {stage:<30} {seconds:6.1f}s")
    print(f"bundle: {outcome.bundle}" + (f"\nVLM bundle: {vlm_bundle}" if vlm_bundle else ""))
    from cluster.report import write_report

    # The held-out predictions above give the report its confusion matrix.
    print(f"report: {write_report(out)}")
    if accuracy < args.min_accuracy:
        print(f"taskray: error: accuracy {accuracy:.3f} < --min-accuracy {args.min_accuracy}")
        return 1
    return 0


# ----- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the docs of every command)."""
    parser = argparse.ArgumentParser(
        prog="taskray",
        description="Fine-tune and serve language models for every LLM task family on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="versions, devices, attention backend, Ray address")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tasks", help="list task families, formulations and row schemas")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser(
        "train",
        help="fine-tune a model from a YAML config",
        description="Fine-tune with Ray Data + Ray Train; writes OUTPUT/bundle. Overrides are "
        "key.path=value pairs, e.g. training.lr=3e-5 task.max_length=64.",
    )
    p.add_argument("config", help="training YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.path=value settings that override the file")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--train", help="training data file or folder (JSONL, Parquet, CSV)")
    p.add_argument("--validation", help="validation file (default: split from --train)")
    p.add_argument("--model", help="model name or local path")
    p.add_argument("--output", help="run directory (bundle at OUTPUT/bundle)")
    p.add_argument("--workers", type=int, help="Ray Train workers")
    p.add_argument("--epochs", type=int, help="training epochs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="a bundle's task metrics on a labelled file")
    p.add_argument("bundle", help="bundle directory (from taskray train)")
    p.add_argument("--data", required=True, help="labelled JSONL, Parquet or CSV file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64, help="generative tasks")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="also write each row and its prediction as JSONL (for `taskray report`)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "serve",
        help="deploy a Serve config and wait until it is ready",
        description="Deploys the Ray Serve config (foreground like `serve run`; Ctrl-C or "
        "SIGTERM drains in-flight requests and stops).",
    )
    p.add_argument("config", nargs="?", help="Serve config YAML (e.g. configs/serve.yaml)")
    p.add_argument("--port", type=int, help="HTTP port (overrides http_options.port)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    p.add_argument("--detach", action="store_true", help="deploy onto a running cluster, return")
    p.add_argument("--stop", action="store_true", help="shut down a detached Serve app")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness")
    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds in-flight requests get to finish (default 30, as "
        "Kubernetes' terminationGracePeriodSeconds)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "quickstart",
        help="train, evaluate, serve and query a sentiment classifier and a tiny "
        "vision-language model end to end",
    )
    p.add_argument("--output", default="runs/quickstart", help="run directory")
    p.add_argument(
        "--no-vlm",
        dest="vlm",
        action="store_false",
        help="skip the vision-language part (about a minute on 2 cores)",
    )
    p.add_argument(
        "--no-adapters",
        dest="adapters",
        action="store_false",
        help="skip the two LoRA adapters over a tiny generator (about a minute on 2 cores)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port for Serve")
    p.add_argument("--min-accuracy", type=float, default=0.85, help="fail below this accuracy")
    p.set_defaults(func=cmd_quickstart)

    from cluster import jobs, k8s, report

    jobs.register(sub, parser)  # `taskray submit` checks COMMAND's arguments with it
    k8s.register(sub)
    report.register(sub)
    from cluster import retrieval_cli

    retrieval_cli.register(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show Ray's own logs and the workers' raw output on the console "
            "(also TASKRAY_LOG_LEVEL=INFO)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``taskray`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills the ``overrides`` positional before later flags, so key=value pairs
    # written after a flag (``train C.yaml --workers 4 training.lr=3e-5``) arrive here.
    if extra and hasattr(args, "overrides") and all("=" in a and a[0] != "-" for a in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        print(
            f"taskray: error: unrecognized arguments: {' '.join(extra)} "
            f"(see taskray {args.command} --help)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if getattr(args, "verbose", False):
        os.environ["TASKRAY_VERBOSE"] = "1"  # read by cluster.console, in this process
    from cluster import lifecycle

    lifecycle.install()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through lifecycle.Terminated
        if lifecycle.received() == signal.SIGTERM:
            print("taskray: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("taskray: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"taskray: error: {redact(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the canonical ``cluster.cli`` module, not this ``__main__`` copy of it: other modules
    # import ``cluster.cli.UserError``, and only that class is caught as a one-line error.
    from cluster.cli import main as _main

    sys.exit(_main())
