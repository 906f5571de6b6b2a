"""The retrieval commands of the ``taskray`` CLI: ``index``, ``evaluate-retrieval``, ``rag-data``.

``cluster.cli.build_parser`` calls ``register(sub)``; errors a user can cause (a held Qdrant
folder, a model mismatch, an unloadable embedder, a bad filter) become ``UserError`` here, so
they print one ``taskray: error:`` line and exit 2 like every other command.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from cluster.errors import UserError


def _as_user_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    @wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from actors.embedder import EmbedderError
        from actors.vectorstore import StoreError

        try:
            return fn(args)
        except (StoreError, EmbedderError) as err:
            raise UserError(str(err)) from None

    return run


def _add_qdrant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", help="Qdrant collection name")
    p.add_argument("--qdrant-path", help="local-mode Qdrant folder (default runs/qdrant)")
    p.add_argument("--qdrant-url", help="Qdrant server URL (API key from QDRANT_API_KEY)")


def _qdrant_options(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    from actors.vectorstore import QdrantOptions
    from cluster.config import validate_config

    data = dict(base or {})
    if args.collection:
        data["collection"] = args.collection
    if args.qdrant_url:
        data["url"] = args.qdrant_url
        data["path"] = None
    if args.qdrant_path:
        data["path"] = args.qdrant_path
        data["url"] = None
    return validate_config(QdrantOptions, data, source="qdrant settings")


def _index_config(args: argparse.Namespace) -> Any:
    from cluster.config import apply_overrides, read_yaml, validate_config
    from cluster.index import IndexConfig

    data = read_yaml(args.config)
    flags = {
        "input": args.input,
        "qdrant.collection": args.collection,
        "output_dir": args.output,
        "ray.address": args.address,
    }
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    data = apply_overrides(data, overrides)
    # A path or URL flag replaces the other, so the file's choice cannot win against it.
    qdrant = data.setdefault("qdrant", {})
    if not isinstance(qdrant, dict):
        from cluster.config import ConfigError

        raise ConfigError(f"{args.config}: qdrant: must be a section")
    if args.qdrant_url:
        qdrant.update(url=args.qdrant_url, path=None)
    if args.qdrant_path:
        qdrant.update(path=args.qdrant_path, url=None)
    return validate_config(IndexConfig, data, source=args.config)


@_as_user_errors
def cmd_index(args: argparse.Namespace) -> int:
    """Chunk, embed and upsert documents into Qdrant with Ray Data."""
    from cluster.index import run_indexing

    outcome = run_indexing(_index_config(args))
    for stage, seconds in outcome.timings.items():
        print(f"  {stage:<24} {seconds:6.1f}s")
    return 0


def _retrieval_defaults(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Qdrant settings and embedder model from ``--config INDEX.yaml`` when given."""
    if not args.config:
        return {}, None
    from cluster.config import read_yaml, validate_config
    from cluster.index import IndexConfig

    cfg = validate_config(IndexConfig, read_yaml(args.config), source=args.config)
    return cfg.qdrant.model_dump(exclude_unset=True), cfg.embedder.model


@_as_user_errors
def cmd_evaluate_retrieval(args: argparse.Namespace) -> int:
    """recall@k and MRR of an index on questions with relevant document ids."""
    from cluster.retrieval import evaluate_retrieval

    base, model = _retrieval_defaults(args)
    report = evaluate_retrieval(
        args.questions, _qdrant_options(args, base), model=args.model or model, k=args.k
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['questions']} questions on collection '{report['collection']}' "
        f"({report['model']}), {len(report['rejected'])} rejected"
    )
    for key, value in report["metrics"].items():
        print(f"{key:<10} {value:.4f}")
    for miss in report["misses"]:
        print(f"  miss (row {miss['row']}): {miss['question']} → {', '.join(miss['top'])}")
    return 0


@_as_user_errors
def cmd_rag_data(args: argparse.Namespace) -> int:
    """RAG training rows: gold passages + retrieved distractors, from questions and an index."""
    from cluster.retrieval import build_rag_rows

    base, model = _retrieval_defaults(args)
    summary = build_rag_rows(
        args.questions,
        _qdrant_options(args, base),
        args.output,
        model=args.model or model,
        k=args.k,
        distractors=args.distractors,
    )
    print(
        f"[taskray] {summary['rows']} rag rows → {summary['output']}, {summary['rejected']} "
        f"rejected → {summary['rejected_path']}"
    )
    return 0


def register(sub: Any) -> None:
    """Add the retrieval subcommands to the ``taskray`` subparsers."""
    p = sub.add_parser(
        "index",
        help="chunk, embed and upsert documents into Qdrant (Ray Data)",
        description="Index documents (JSONL with id/text/title?/url?/metadata?, or .txt/.md "
        "files) into a Qdrant collection. Re-running updates in place (deterministic point "
        "ids); bad documents go to OUTPUT/rejected.jsonl.",
    )
    p.add_argument("config", help="index YAML (see configs/index.yaml)")
    p.add_argument("overrides", nargs="*", help="key.path=value settings that override the file")
    p.add_argument("--input", help="documents file or folder")
    p.add_argument("--output", help="folder for rejected.jsonl and index.json")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    _add_qdrant_flags(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "evaluate-retrieval",
        help="recall@k and MRR of an index on labelled questions",
        description="Questions are JSONL rows {question, relevant_ids: [document ids]}; the "
        "ranking is the k best distinct documents.",
    )
    p.add_argument("--questions", required=True, help="JSONL of question + relevant_ids")
    p.add_argument("--k", type=int, default=5, help="cut-off for recall@k")
    p.add_argument("--config", help="index YAML to take the Qdrant settings and model from")
    p.add_argument("--model", help="embedding model (default: the one the collection records)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_qdrant_flags(p)
    p.set_defaults(func=cmd_evaluate_retrieval)

    p = sub.add_parser(
        "rag-data",
        help="RAG fine-tuning rows (gold + retrieved distractors) from questions and an index",
        description="Rows {question, answer, relevant_ids | passages} → rag task rows "
        "{question, answer, passages, distractors} for `taskray train configs/rag.yaml`.",
    )
    p.add_argument("--questions", required=True, help="JSONL of question, answer, relevant_ids")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--k", type=int, default=8, help="chunks retrieved for distractors")
    p.add_argument("--distractors", type=int, default=3, help="distractors per row at most")
    p.add_argument("--config", help="index YAML to take the Qdrant settings and model from")
    p.add_argument("--model", help="embedding model (default: the one the collection records)")
    _add_qdrant_flags(p)
    p.set_defaults(func=cmd_rag_data)
