"""Retrieval on this machine: indexing throughput (chunks/s through `index_documents` with
all-MiniLM-L6-v2: chunk → embed → upsert into a local Qdrant folder) and query latency at k=10
over 10k and 100k chunks, embedded Qdrant (local mode, through `VectorStore.search`) vs exact
numpy search (normalised dot product) over the same vectors, with Qdrant's recall@10 against
the exact top 10.

    python benchmarks/retrieval.py            # ~3k real chunks embedded; 10k and 100k points
    python benchmarks/retrieval.py --smoke    # ~100 chunks, 2k points, 20 queries; what CI runs

Prints a table and writes benchmarks/results/retrieval[-smoke].{json,png}. Embedding 100k texts
on 2 CPU cores would take the best part of an hour, so only the throughput run embeds real text:
documents recombined from the fixture corpus's sentences. The search collections hold those
real chunk vectors plus synthetic ones (a random mix of two real vectors plus Gaussian noise,
renormalised), which stay in the region of the sphere MiniLM uses, so neighbours are not
trivially far apart. Queries are the fixture questions, embedded, plus perturbed real chunk
vectors. Qdrant's local mode has no HNSW index: it scores every point with numpy, so its
recall@10 should be 1.0 and the gap to plain numpy is its per-query overhead. A Qdrant server
(HNSW) is the thing to measure for approximate search at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.embedder import Embedder
from actors.indexing import index_documents, text_file_row
from actors.vectorstore import QdrantOptions, VectorStore

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CORPUS = ROOT / "data" / "fixtures" / "corpus"
QUESTIONS = ROOT / "data" / "fixtures" / "retrieval_questions.jsonl"
K = 10
ENGINES = ("qdrant_local", "numpy_exact")


def corpus_documents() -> list[dict[str, Any]]:
    """The fixture corpus, read as the indexing job reads it (JSONL rows and handbook files)."""
    docs = [
        json.loads(line)
        for f in sorted(CORPUS.glob("*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    for path in sorted((CORPUS / "handbook").iterdir()):
        docs.append(json.loads(text_file_row(path.read_bytes(), str(path), str(CORPUS))))
    return docs


def make_documents(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` documents of 6–14 sentences drawn from the fixture corpus: real prose of realistic
    length (about 1–4 chunks of 128 tokens each), in numbers the corpus itself lacks."""
    rng = random.Random(seed)
    source = corpus_documents()
    sentences = [
        s.strip()
        for d in source
        for s in re.split(r"(?<=[.!?])\s+", d["text"].replace("\n", " "))
        if len(s.split()) >= 5
    ]
    titles = [d.get("title") or d["id"] for d in source]
    return [
        {
            "id": f"bench-{i}",
            "title": f"{rng.choice(titles)} ({i})",
            "text": " ".join(rng.choices(sentences, k=rng.randint(6, 14))),
            "metadata": {"topic": "benchmark"},
        }
        for i in range(n)
    ]


class TimedEmbedder:
    """The embedder, timing its calls (to split embedding from chunking and upserting) and
    keeping the document vectors it returns (the real part of the search collections)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.vectors: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed(self, texts: list[str], kind: str = "document") -> np.ndarray:
        t = time.perf_counter()
        vectors = self.inner.embed(texts, kind=kind)
        self.seconds += time.perf_counter() - t
        if kind == "document":
            self.vectors.append(vectors)
        return vectors


def index_throughput(
    embedder: Embedder, n_docs: int, folder: str
) -> tuple[dict[str, Any], np.ndarray]:
    """Index ``n_docs`` recombined documents with ``index_documents``; returns the figures and
    the chunk vectors."""
    docs = make_documents(n_docs)
    timed = TimedEmbedder(embedder)
    with VectorStore.open(QdrantOptions(path=folder, collection="throughput")) as store:
        t = time.perf_counter()
        out = index_documents(docs, timed, store)
        seconds = time.perf_counter() - t
        assert store.count() == out["chunks"]
    vectors = np.concatenate(timed.vectors)
    return {
        "documents": out["documents"],
        "chunks": out["chunks"],
        "seconds": seconds,
        "chunks_per_s": out["chunks"] / seconds,
        "embed_seconds": timed.seconds,
        "chunk_and_upsert_seconds": seconds - timed.seconds,
    }, vectors


def synthesise(real: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors near the real ones: a random convex mix of two real vectors plus
    Gaussian noise of about 0.6 of their length, renormalised."""
    d = real.shape[1]
    a = real[rng.integers(0, len(real), n)]
    b = real[rng.integers(0, len(real), n)]
    w = rng.random((n, 1), dtype=np.float32)
    noise = rng.standard_normal((n, d), dtype=np.float32) * (0.6 / np.sqrt(d))
    v = w * a + (1 - w) * b + noise
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def make_queries(
    embedder: Embedder, real: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """The fixture questions embedded as queries, topped up with perturbed real chunk vectors."""
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()]
    queries = embedder.embed(questions[:n], kind="query")
    if len(queries) < n:
        extra = real[rng.integers(0, len(real), n - len(queries))]
        extra = extra + rng.standard_normal(extra.shape, dtype=np.float32) * (
            0.3 / np.sqrt(real.shape[1])
        )
        extra /= np.linalg.norm(extra, axis=1, keepdims=True)
        queries = np.concatenate([queries, extra.astype(np.float32)])
    return queries


def exact_top_k(matrix: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the ``k`` best dot products, best first (vectors are unit length, so this
    is cosine similarity)."""
    scores = matrix @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def percentiles(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(np.mean(ms)),
    }


def search_benchmark(
    real: np.ndarray, n_points: int, queries: np.ndarray, folder: str, model: str, seed: int
) -> dict[str, Any]:
    """Build one collection of ``n_points`` (the real vectors first, then synthetic ones) and
    time ``k=10`` queries through both engines."""
    rng = np.random.default_rng(seed)
    n_real = min(len(real), n_points)
    matrix = np.concatenate([real[:n_real], synthesise(real, n_points - n_real, rng)])
    chunks = [
        {
            "doc_id": str(i),
            "chunk_index": 0,
            "title": None,
            "text": "real chunk" if i < n_real else "synthetic vector",
            "start": 0,
            "end": 0,
            "metadata": {"kind": "real" if i < n_real else "synthetic"},
        }
        for i in range(n_points)
    ]
    opts = QdrantOptions(path=folder, collection=f"points-{n_points}")
    with VectorStore.open(opts) as store:
        store.ensure_collection(matrix.shape[1], model)
        t = time.perf_counter()
        store.upsert_chunks(chunks, matrix)
        upsert_s = time.perf_counter() - t
        for q in queries[:3]:  # warm-up: first calls pay for lazy loading in both engines
            store.search(q, k=K)
            exact_top_k(matrix, q, K)
        times: dict[str, list[float]] = {e: [] for e in ENGINES}
        recalls = []
        for q in queries:
            t = time.perf_counter()
            hits = store.search(q, k=K)
            times["qdrant_local"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            exact = exact_top_k(matrix, q, K)
            times["numpy_exact"].append((time.perf_counter() - t) * 1000)
            found = {int(h["doc_id"]) for h in hits}
            recalls.append(len(found & {int(i) for i in exact}) / K)
    return {
        "points": n_points,
        "real_points": n_real,
        "synthetic_points": n_points - n_real,
        "queries": len(queries),
        "upsert_seconds": upsert_s,
        "upsert_points_per_s": n_points / upsert_s,
        "latency": {e: percentiles(times[e]) for e in ENGINES},
        "qdrant_recall_at_10_vs_exact": float(np.mean(recalls)),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput on the left, p50/p99 latency per engine and size on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=[1, 2.2])
    th = report["indexing"]
    left.bar(["chunks/s"], [th["chunks_per_s"]], color="#2a7")
    left.set_title(f"index_documents, MiniLM\n{th['chunks']:,} chunks, {report['cpus']} CPUs")
    left.set_ylabel("chunks / s")
    labels, p50, p99 = [], [], []
    for run in report["search"]:
        for engine in ENGINES:
            labels.append(f"{engine}\n{run['points'] // 1000}k")
            p50.append(run["latency"][engine]["p50_ms"])
            p99.append(run["latency"][engine]["p99_ms"])
    x = np.arange(len(labels))
    right.bar(x - 0.2, p50, 0.4, label="p50", color="#37a")
    right.bar(x + 0.2, p99, 0.4, label="p99", color="#a73")
    right.set_xticks(x, labels, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ms per query (k=10, log scale)")
    right.set_title("query latency: embedded Qdrant vs exact numpy")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="~100 chunks, 2k points; seconds")
    parser.add_argument("--docs", type=int, help="documents to index (default 1200)")
    parser.add_argument("--points", type=int, nargs="+", help="collection sizes (10000 100000)")
    parser.add_argument("--queries", type=int, help="queries per size (default 200)")
    args = parser.parse_args()
    n_docs = args.docs or (40 if args.smoke else 1200)
    sizes = args.points or ([2000] if args.smoke else [10_000, 100_000])
    n_queries = args.queries or (20 if args.smoke else 200)
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]

    t0 = time.perf_counter()
    embedder = Embedder("all-MiniLM-L6-v2", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        indexing, real = index_throughput(embedder, n_docs, os.path.join(tmp, "throughput"))
        queries = make_queries(embedder, real, n_queries, np.random.default_rng(1))
        search = [
            search_benchmark(
                real, n, queries, os.path.join(tmp, "search"), embedder.model_name, seed=n
            )
            for n in sizes
        ]
    report = {
        "model": embedder.model_name,
        "cpus": cpus,
        "load_average_at_start": load,
        "k": K,
        "indexing": indexing,
        "search": search,
        "vectors": (
            f"{len(real)} real chunk vectors (documents recombined from the fixture corpus's "
            "sentences, embedded) plus synthetic ones: a random mix of two real vectors plus "
            "Gaussian noise, renormalised; queries are the fixture questions plus perturbed "
            "real chunk vectors"
        ),
        "qdrant_mode": "local (embedded, on-disk folder): exact scoring in numpy, no HNSW",
        "seconds": time.perf_counter() - t0,
        "smoke": args.smoke,
    }

    print(f"{report['model']}, {cpus} CPUs (load average {load:.1f} at start)")
    print(
        f"indexing: {indexing['chunks']:,} chunks of {indexing['documents']:,} documents in "
        f"{indexing['seconds']:.1f} s = {indexing['chunks_per_s']:.1f} chunks/s "
        f"(embedding {indexing['embed_seconds']:.1f} s, chunking + upserting "
        f"{indexing['chunk_and_upsert_seconds']:.1f} s)"
    )
    print(f"search, k={K}: {report['vectors']}")
    print(
        f"{'points':>8} {'engine':<13} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} "
        f"{'recall@10':>10} {'upsert s':>9}"
    )
    for run in search:
        for engine in ENGINES:
            lat = run["latency"][engine]
            recall = f"{run['qdrant_recall_at_10_vs_exact']:.3f}" if engine == ENGINES[0] else "1"
            upsert = f"{run['upsert_seconds']:.1f}" if engine == ENGINES[0] else "-"
            print(
                f"{run['points']:>8,} {engine:<13} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f} "
                f"{lat['mean_ms']:>8.2f} {recall:>10} {upsert:>9}"
            )
    print("(recall@10 of Qdrant against the exact numpy top 10; numpy is the reference)")
    RESULTS.mkdir(exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    (RESULTS / f"retrieval{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(report, RESULTS / f"retrieval{suffix}.png")
    except ImportError:
        print("(matplotlib not installed: no chart; pip install -e '.[bench]')")
    print(f"total {report['seconds']:.1f} s")


if __name__ == "__main__":
    main()
