"""Loss masks of every causal family: the supervised ids are exactly the target's tokens + EOS,
for a WordPiece (MiniLM) and a byte-level BPE tokenizer; dialogue masks for three templates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tasks import IGNORE_INDEX, RowError, TaskError, get_task
from tests.toy_tokenizers import STYLES, bpe_tokenizer, end_of_turn

FIXTURES = Path(__file__).resolve().parents[2] / "data" / "fixtures"


def fixture(name: str, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]
    return rows[:limit] if limit else rows


def supervised(features: dict) -> list[int]:
    return [
        i
        for i, lab in zip(features["input_ids"], features["labels"], strict=True)
        if lab != IGNORE_INDEX
    ]


def eos_of(tok) -> int:
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


@pytest.fixture(params=["wordpiece", "bpe"])
def tokenizer(request, minilm_tokenizer):
    return minilm_tokenizer if request.param == "wordpiece" else bpe_tokenizer("chatml")


CAUSAL = [
    ("generation", {}, "generation"),
    ("code", {}, "code"),
    ("reasoning", {}, "reasoning"),
    ("generative_qa", {"formulation": "causal"}, "generative_qa"),
    ("summarization", {"formulation": "causal"}, "summarization"),
    ("translation", {"formulation": "causal"}, "translation"),
]


@pytest.mark.parametrize(("family", "kwargs", "data"), CAUSAL)
def test_causal_supervised_tokens_are_the_target(family, kwargs, data, tokenizer):
    task = get_task(family, max_length=1024, **kwargs)
    for raw in fixture(data, 20):
        row = task.validate(raw)
        features = task.encode_row(row, tokenizer)
        target = task.target(row)
        expected = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos_of(tokenizer)]
        assert supervised(features) == expected
        n_prompt = len(features["labels"]) - len(expected)
        assert features["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert features["labels"][n_prompt:] == features["input_ids"][n_prompt:]
        if tokenizer is not None and tokenizer.eos_token == "<|im_end|>":
            # Byte-level BPE round-trips text exactly.
            assert tokenizer.decode(supervised(features)[:-1]) == target
            prompt = task.prompt(row)
            assert tokenizer.decode(features["input_ids"][:n_prompt]) == prompt


def test_reasoning_target_is_rationale_then_answer_line():
    task = get_task("reasoning")
    row = task.validate({"question": "2+2?", "rationale": "Two plus two is four.", "answer": "4"})
    assert task.target(row) == "Two plus two is four.\nAnswer: 4"
    decoded = task.decode(["Two and two.\nSo four.\nAnswer: 4."])[0]
    assert decoded["answer"] == "4" and decoded["steps"] == ["Two and two.", "So four."]
    assert task.metrics(
        [{"answer": "4.0"}, {"answer": "1,250"}], [{"answer": "4"}, {"answer": "1250"}]
    ) == {"accuracy": 1.0}


def test_truncation_keeps_the_prompt_end_and_never_trains_on_nothing(tokenizer):
    task = get_task("generation", max_length=16)
    row = task.validate({"prompt": "word " * 100 + "final question?", "completion": "short answer"})
    features = task.encode_row(row, tokenizer)
    assert len(features["input_ids"]) <= 16
    expected = tokenizer("short answer", add_special_tokens=False)["input_ids"] + [
        eos_of(tokenizer)
    ]
    assert supervised(features) == expected
    long = task.validate(
        {"prompt": "q " * 50, "completion": "a b c d e f g h i j k l m n o p q r s"}
    )
    cut = task.encode_row(long, tokenizer)
    assert len(cut["input_ids"]) == 16
    assert 0 < len(supervised(cut)) <= 8
    with pytest.raises(RowError, match="completion"):
        task.validate({"prompt": "x", "completion": "   "})


def test_seq2seq_formulation_puts_the_target_in_labels(minilm_tokenizer):
    task = get_task("summarization", formulation="seq2seq", max_length=64)
    row = task.validate(fixture("summarization", 1)[0])
    features = task.encode_row(row, minilm_tokenizer)
    assert task.model_kind == "seq2seq_lm"
    assert features["input_ids"][:3] == minilm_tokenizer("summarize:")["input_ids"][:3]
    assert (
        features["labels"]
        == minilm_tokenizer(text_target=row["summary"], truncation=True, max_length=64)["input_ids"]
    )


def test_classification_decoder_formulation(tokenizer):
    task = get_task(
        "classification", formulation="decoder", labels=["Negative", "Positive"], max_length=64
    )
    row = task.validate({"text": "Lovely hotel.", "label": "Positive"})
    features = task.encode_row(row, tokenizer)
    expected = tokenizer(" Positive", add_special_tokens=False)["input_ids"] + [eos_of(tokenizer)]
    assert supervised(features) == expected
    scoring = task.scoring_inputs(row, tokenizer)
    assert scoring["continuations"][1] == expected
    assert features["input_ids"][: len(scoring["prompt_ids"])] == scoring["prompt_ids"]
    pred = task.decode([[-5.0, -1.0]])[0]
    assert pred["label"] == "Positive" and pred["score"] == pytest.approx(0.982, abs=1e-3)


def test_rag_prompt_budget_citations_and_training_target(tokenizer):
    from tasks.rag import extract_citations

    task = get_task("rag", max_length=1024)
    for raw in fixture("rag", 10):
        row = task.validate(raw)
        features = task.encode_row(row, tokenizer)
        prompt = task.generation_prompt(row, tokenizer)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        target_ids = features["input_ids"][n_prompt:]
        assert supervised(features) == target_ids
        assert target_ids[-1] == eos_of(tokenizer)
        if tokenizer.eos_token == "<|im_end|>":
            answer, cited = extract_citations(tokenizer.decode(target_ids[:-1]))
            assert answer == row["answer"]
            assert cited and set(cited) <= {p["id"] for p in row["passages"]}
            assert all(f"[{c}]" in prompt for c in cited)
    from tasks.rag import build_prompt

    passages = [{"id": f"p{i}", "text": "word " * 10} for i in range(5)]
    prompt, used = build_prompt("q?", passages, budget=25)
    assert [p["id"] for p in used] == ["p0", "p1"]
    assert "[p0]" in prompt and "[p2]" not in prompt
    assert task.decode(["Paris [doc-1] [doc-2] [doc-1]"])[0] == {
        "answer": "Paris",
        "citations": ["doc-1", "doc-2"],
    }


def test_multimodal_placeholder_expands_to_visual_tokens():
    tok = copy.deepcopy(bpe_tokenizer("chatml"))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    task = get_task("multimodal", max_length=128, options={"num_image_tokens": 9})
    for raw in fixture("multimodal", 10):
        row = task.validate(raw)
        features = task.encode_row(row, tok)
        positions = [i for i, t in enumerate(features["input_ids"]) if t == image_id]
        assert len(positions) == 9
        assert positions == list(range(positions[0], positions[0] + 9))
        assert all(features["labels"][i] == IGNORE_INDEX for i in positions)
        assert tok.decode(supervised(features)[:-1]) == " " + row["answer"]
    with pytest.raises(RowError, match="tokenizer"):
        task.encode_row(task.validate(fixture("multimodal", 1)[0]), bpe_tokenizer("chatml"))


# ----- dialogue ------------------------------------------------------------------------------
def runs(features: dict) -> list[list[int]]:
    """Contiguous supervised spans."""
    out, current = [], []
    for token, label in zip(features["input_ids"], features["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def expected_turn(content: str, style: str) -> set[str]:
    eot = end_of_turn(style)
    return {content + eot, " " + content + eot, content.strip() + eot}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_dialogue_supervises_exactly_the_assistant_turns(style):
    tok = bpe_tokenizer(style)
    task = get_task("dialogue", max_length=4096)
    seen_system = seen_multi = 0
    for raw in fixture("dialogue"):
        row = task.validate(raw)
        messages = row["messages"]
        seen_system += messages[0]["role"] == "system"
        assistants = [m["content"] for m in messages if m["role"] == "assistant"]
        seen_multi += len(assistants) > 1
        features = task.encode_row(row, tok)
        spans = runs(features)
        assert len(spans) == len(assistants)
        for span, content in zip(spans, assistants, strict=True):
            assert tok.decode(span) in expected_turn(content, style)
        # The whole sequence is the template's own rendering.
        assert tok.decode(features["input_ids"]) == tok.apply_chat_template(
            messages, tokenize=False
        )
    assert seen_system >= 5 and seen_multi >= 5


@pytest.mark.parametrize("style", sorted(STYLES))
def test_dialogue_last_turn_only_and_truncation(style):
    tok = bpe_tokenizer(style)
    rows = [
        r
        for r in (get_task("dialogue").validate(x) for x in fixture("dialogue"))
        if sum(m["role"] == "assistant" for m in r["messages"]) > 1
    ]
    row = rows[0]
    last_only = get_task("dialogue", options={"train_on": "last"}).encode_row(row, tok)
    assert len(runs(last_only)) == 1
    assert tok.decode(runs(last_only)[0]) in expected_turn(row["messages"][-1]["content"], style)
    full = get_task("dialogue", max_length=4096).encode_row(row, tok)
    first_end = next(i for i, lab in enumerate(full["labels"]) if lab != IGNORE_INDEX) + 2
    cut = get_task("dialogue", max_length=first_end).encode_row(row, tok)
    assert len(cut["input_ids"]) == first_end
    assert len(supervised(cut)) == 2
    with pytest.raises(RowError, match="no assistant tokens left within max_length"):
        get_task("dialogue", max_length=first_end - 2).encode_row(row, tok)


def test_dialogue_formats_are_converted():
    task = get_task("dialogue")
    share = task.validate(
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
            ]
        }
    )
    assert [m["role"] for m in share["messages"]] == ["system", "user", "assistant"]
    alpaca = task.validate({"instruction": "Add", "input": "2 and 3", "output": "5"})
    assert alpaca["messages"] == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    no_input = task.validate({"instruction": "Say hi", "input": "", "output": "hi"})
    assert no_input["messages"][0]["content"] == "Say hi"
    formats = {
        ("messages" in r) + 2 * ("conversations" in r) + 4 * ("instruction" in r)
        for r in fixture("dialogue")
    }
    assert formats == {1, 2, 4}


def test_dialogue_rejects_unstable_templates_and_missing_templates(minilm_tokenizer):
    tok = copy.deepcopy(bpe_tokenizer("chatml"))
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ messages | length }}"
    )
    row = get_task("dialogue").validate(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    )
    with pytest.raises(RowError, match="prefixes"):
        get_task("dialogue").encode_row(row, tok)
    with pytest.raises(TaskError, match="chat template"):
        get_task("dialogue").encode_row(row, minilm_tokenizer)


# ----- schemas -------------------------------------------------------------------------------
BAD_ROWS = [
    ("generation", {"completion": "x"}, "prompt"),
    ("generation", {"prompt": 3, "completion": "x"}, "prompt"),
    ("dialogue", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    (
        "dialogue",
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "messages",
    ),
    ("dialogue", {"messages": [{"role": "wizard", "content": "a"}]}, "messages.0.role"),
    ("dialogue", {"conversations": [{"from": "alien", "value": "a"}]}, "row"),
    ("nli", {"premise": "a", "hypothesis": "b", "label": "maybe"}, "label"),
    ("nli", {"premise": "a", "label": "neutral"}, "hypothesis"),
    ("generative_qa", {"answer": "x"}, "question"),
    ("summarization", {"document": ""}, "document"),
    (
        "translation",
        {"source": "a", "target": "b", "source_lang": "English", "target_lang": "de"},
        "source_lang",
    ),
    ("code", {"prompt": "p", "code": "c", "tests": "assert True"}, "tests"),
    ("reasoning", {"question": ["q"]}, "question"),
    ("rag", {"question": "q", "passages": [{"id": "a"}]}, "passages.0.text"),
    ("multimodal", {"image": "data:image/png;base64,@@@", "prompt": "p"}, "image"),
    ("multimodal", {"prompt": "p", "answer": "a"}, "image"),
]


@pytest.mark.parametrize(("family", "row", "field"), BAD_ROWS)
def test_malformed_rows_name_the_field(family, row, field):
    with pytest.raises(RowError) as info:
        get_task(family).validate(row)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize(
    "family",
    [
        "generation",
        "dialogue",
        "nli",
        "generative_qa",
        "summarization",
        "translation",
        "code",
        "reasoning",
        "rag",
        "multimodal",
    ],
)
def test_every_fixture_row_is_valid(family):
    task = get_task(family)
    rows = fixture(family)
    assert len(rows) >= 40
    for raw in rows:
        task.validate(raw)
