"""In-process inference over a loaded bundle, shared by `taskray evaluate` and Serve replicas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from actors.bundle import LoadedBundle


def predict_classification(
    bundle: LoadedBundle, texts: Sequence[str], all_scores: bool = False
) -> list[dict[str, Any]]:
    """Classify a batch of texts with a classification bundle (either formulation)."""
    return predict_rows(bundle, [{"text": t} for t in texts], all_scores=all_scores)


def predict_rows(
    bundle: LoadedBundle,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int = 64,
    all_scores: bool = False,
) -> list[dict[str, Any]]:
    """Predict validated rows with any bundle: encoder heads decode their logits, generative
    models decode greedily, the classification decoder scores each label."""
    from actors.steps import collate

    task, model, tok = bundle.task, bundle.model, bundle.tokenizer
    kind = task.model_kind
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if kind in ("causal_lm", "seq2seq_lm"):
        if task.formulation == "decoder":
            return _score_labels(bundle, rows, all_scores)
        return generate_rows(bundle, rows, max_new_tokens)
    features: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        encoded = task.encode_row(row, tok)
        for feature in encoded if isinstance(encoded, list) else [encoded]:
            features.append((i, feature))
    batch = {k: [f[k] for _, f in features] for k in features[0][1]}
    inputs = collate(batch, pad_id, device)
    model_inputs = {
        k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    with torch.inference_mode():
        out = model(**model_inputs)
    if kind == "sequence_classification":
        return task.decode(out.logits.float().cpu().numpy(), all_scores=all_scores)
    lengths = [len(f["input_ids"]) for _, f in features]
    if kind == "token_classification":
        logits = out.logits.float().cpu().numpy()
        per_row = [
            {"logits": logits[j, :n], "word_ids": features[j][1]["word_ids"]}
            for j, n in enumerate(lengths)
        ]
        return task.decode(per_row, rows)
    starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
    windows: list[list[dict]] = [[] for _ in rows]
    for j, (i, feature) in enumerate(features):
        n = lengths[j]
        windows[i].append(
            {
                "start_logits": starts[j, :n],
                "end_logits": ends[j, :n],
                "offset_mapping": feature["offset_mapping"],
            }
        )
    return task.decode(windows, rows)


def generate_rows(
    bundle: LoadedBundle, rows: Sequence[dict[str, Any]], max_new_tokens: int = 64
) -> list[dict[str, Any]]:
    """Greedy generation for generative tasks (causal: left padding; seq2seq: right)."""
    task, model, tok = bundle.task, bundle.model, bundle.tokenizer
    device = next(model.parameters()).device
    tok.padding_side = "left" if task.model_kind == "causal_lm" else "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = [task.generation_prompt(r, tok) for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    new = out[:, enc["input_ids"].shape[1] :] if task.model_kind == "causal_lm" else out
    return task.decode(tok.batch_decode(new, skip_special_tokens=True), rows)


def label_scores(model: Any, task: Any, tok: Any, row: dict[str, Any], device: Any) -> list[float]:
    """Summed log-probabilities of each label's continuation after the row's prompt (one
    forward over all labels), for the decoder formulation of classification."""
    spec = task.scoring_inputs(row, tok)
    seqs = [spec["prompt_ids"] + c for c in spec["continuations"]]
    longest = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    start = len(spec["prompt_ids"])
    out = []
    for i, cont in enumerate(spec["continuations"]):
        positions = torch.arange(start - 1, start - 1 + len(cont))
        out.append(float(logprobs[i, positions, torch.tensor(cont)].sum()))
    return out


def _score_labels(
    bundle: LoadedBundle, rows: Sequence[dict[str, Any]], all_scores: bool
) -> list[dict[str, Any]]:
    """Decoder classifier: softmax over each label's summed log-probability."""
    device = next(bundle.model.parameters()).device
    scores = [label_scores(bundle.model, bundle.task, bundle.tokenizer, r, device) for r in rows]
    return bundle.task.decode(scores, all_scores=all_scores)
