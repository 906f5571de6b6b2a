"""What the benchmark sends: the classifier's reviews and concurrencies, the generator's prompts,
concurrencies, LoRA adapters and mixed load, and how many requests warm each cell up."""

from __future__ import annotations

from typing import Any

CONCURRENCY = (1, 8, 32)
SYSTEMS = ("serve_batched", "serve_unbatched", "fastapi_pipeline")
GEN_CONCURRENCY = (1, 4, 8, 16)
MIXED_CONCURRENCY = 16  # the mixed load (streamed and not, two adapters, two lengths)
ADAPTERS = {"style-a": 1, "style-b": 2}  # LoRA adapters over the generator (name: seed)
GEN_MAX_TOKENS = 64
# The generator's model sizes: tiny:llama's config with these overrides, random weights.
# "toy" (2 layers, width 64, 0.14M parameters) decodes a batch of 16 in ~2.5 ms a step on one
# CPU thread, so its figures magnify what serving costs per request; "small" (6 layers, width
# 384, 12M parameters) takes ~18 ms a step, within the range of a 7B-13B model's batched
# decode step on one data-centre GPU (roughly 10-25 ms), so its balance of compute against
# per-request transport is closer to a real deployment's.
GEN_MODELS: dict[str, dict[str, int]] = {
    "toy": {},
    "small": {
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
    },
}


def generator_key(size: str) -> str:
    """Where a model size's generator figures sit in the report (the toy's key predates sizes)."""
    return "generator" if size == "toy" else f"generator_{size}"


REVIEWS = [
    "Arrived two days early and works exactly as described.",
    "The battery dies before lunch. Returning it.",
    "Honestly the best pizza I've had outside Naples.",
    "Customer service hung up on me twice. Never again.",
    "Comfortable shoes, but they squeak on wooden floors.",
    "The plot dragged in the middle, yet the ending made up for it.",
    "Cheap plastic, snapped the first time I used it.",
    "Great value for the price; my kids love it.",
    "The hotel room smelled of smoke and the sheets were stained.",
    "Setup took five minutes and the app is genuinely intuitive.",
    "Not worth the hype. Bland and overpriced.",
    "Our waiter was attentive without hovering. Lovely evening.",
    "The headphones sound fine but hurt my ears after an hour.",
    "I've reread this book three times and still find new things in it.",
    "Package was soaked and the box was crushed.",
    "Fast shipping, well packaged, exactly what I ordered.",
    "The sequel is a cynical cash grab with none of the original's charm.",
    "Quiet, powerful, and easy to clean. Five stars.",
    "It stopped charging after a week and support never replied.",
    "A cosy little cafe with excellent coffee and friendly staff.",
    "Instructions were missing and two screws didn't fit.",
    "The update fixed every bug I complained about. Impressed.",
    "Flimsy zipper, faded after one wash.",
    "Surprisingly good for a budget phone; the camera is decent in daylight.",
    "Waited forty minutes for cold food.",
    "Perfect fit and the fabric feels premium.",
    "The film looks gorgeous but the dialogue is painfully wooden.",
    "My go-to blender for smoothies; crushes ice with no trouble.",
    "Misleading photos. The real thing is half the size.",
    "Friendly host, spotless apartment, great location near the station.",
]

PROMPTS = [
    "Write a short note about the train timetable.",
    "Summarize the following article in one sentence.",
    "Question: what is 12 times 7? Answer:",
    "You are a helpful assistant. Please answer briefly and politely.",
    "Translate English to German: The weather is nice today.",
    "Paris is the capital of France; Berlin is",
    "The quick brown fox",
    "def add(a, b):",
]


def mixed_jobs(max_tokens: int) -> list[dict[str, Any]]:
    """The mixed load, cycled by its clients: every prompt through the base model and each
    adapter, half streamed and half not, at the full and at half the token budget."""
    models = ["writer", *ADAPTERS]
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        for j, model in enumerate(models):
            k = i * len(models) + j
            tokens = max_tokens if k % 4 < 2 else max_tokens // 2
            jobs.append({"prompt": prompt, "model": model, "max_tokens": tokens,
                         "stream": k % 2 == 0})  # fmt: skip
    return jobs


def job_key(job: dict[str, Any]) -> tuple[str, str, int]:
    """What a job's greedy reference text depends on."""
    return job["prompt"], job["model"], job["max_tokens"]


def warmup_requests(concurrency: int) -> int:
    """Requests sent (and discarded) before measuring at this concurrency."""
    return max(8, 2 * concurrency)


def warmup_streams(concurrency: int) -> int:
    """Streamed requests sent (and discarded) before measuring at this concurrency."""
    return 2 * concurrency + 2
