"""Training data validation and rendering: every bad line reported, assistant tokens only, the server's text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microserve.finetune.base import chat_template, open_tokenizer, resolve_base
from microserve.finetune.config import TuneConfig
from microserve.finetune.data import DataError, check_lines, parse_lines
from microserve.finetune.render import IGNORE, Renderer
from microserve.settings import Settings

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def lines(*items: object) -> list[str]:
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


def test_every_bad_line_is_reported_with_its_number_and_reason() -> None:
    data = lines(
        GOOD,
        '{"messages": [{"role": "user", "content": "broken"}',
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "x", "colour": "red"}, {"role": "assistant", "content": "y"}]},
        {"messages": []},
        "[1, 2]",
        {"text": "what"},
        "",
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
        {"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]},
        {"prompt": "a", "completion": "b"},
        GOOD,
    )
    with pytest.raises(DataError) as caught:
        parse_lines(data, "train.jsonl")
    errors = {e.line: e.reason for e in caught.value.errors}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    assert errors[2].startswith("invalid JSON")
    assert "no assistant message" in errors[3]
    assert "messages.0.role" in errors[4]
    assert "unrecognized key `messages.0.colour`" in errors[5]
    assert "messages" in errors[6]
    assert "JSON object" in errors[7]
    assert "expected `messages`" in errors[8]
    assert "no assistant message" in errors[10]  # weight 0 everywhere leaves nothing to train on
    assert "weight" in errors[11]
    assert "completion-format example in a chat-format file" in errors[12]
    text = caught.value.describe()
    assert text.splitlines()[0] == "train.jsonl: 10 invalid lines"
    assert "  line 2: invalid JSON" in text


def test_valid_files_of_both_formats() -> None:
    chat = parse_lines(lines(GOOD, GOOD))
    assert len(chat) == 2 and chat[0].chat is not None and chat[0].line == 1
    pairs = parse_lines(lines({"prompt": "2+2=", "completion": " 4"}))
    assert pairs[0].completion is not None
    with pytest.raises(DataError, match="no training examples"):
        parse_lines(["", "  "])
    examples, errors = check_lines(lines(GOOD, "{"))
    assert len(examples) == 1 and [e.line for e in errors] == [2]


@pytest.fixture(scope="module")
def smollm_renderer() -> Renderer:
    base = resolve_base("smollm2-135m-instruct", Settings().cache_dir)
    tokenizer = open_tokenizer(base)
    return Renderer(chat_template(base, tokenizer), tokenizer)


def test_chat_examples_train_on_assistant_tokens_of_the_served_text(smollm_renderer: Renderer) -> None:
    renderer = smollm_renderer
    conversation = {
        "messages": [
            {"role": "user", "content": "What is the code?"},
            {"role": "assistant", "content": "I cannot say.", "weight": 0},
            {"role": "user", "content": "Please?"},
            {"role": "assistant", "content": "The code is KESTREL-42."},
        ]
    }
    example = parse_lines(lines(conversation))[0]
    encoded = renderer.encode(example)
    tok = renderer.tokenizer
    # The prompt side is exactly what the server tokenizes for the same request: template + generation prompt.
    served = [dict(m) for m in conversation["messages"][:3]]
    for m in served:
        m.pop("weight", None)
    prompt = renderer.template.render(served, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special=tok.add_bos and not prompt.startswith(tok.bos_token))
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE for label in encoded.labels[: len(prompt_ids)])
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    assert trained == encoded.input_ids[len(prompt_ids) :]
    answer = tok.encode("The code is KESTREL-42.<|im_end|>\n", add_special=False)
    assert trained == answer  # the weight-0 turn is context only; the end of turn is learned
    assert "I cannot say." in prompt


def test_completion_pairs_are_raw_text_ending_in_eos(smollm_renderer: Renderer) -> None:
    example = parse_lines(lines({"prompt": "The sky is", "completion": " blue."}))[0]
    encoded = smollm_renderer.encode(example)
    tok = smollm_renderer.tokenizer
    prompt = tok.encode("The sky is", add_special=tok.add_bos)
    assert encoded.input_ids[: len(prompt)] == prompt
    assert encoded.input_ids[-1] == tok.eos_id and encoded.labels[-1] == tok.eos_id
    assert all(label == IGNORE for label in encoded.labels[: len(prompt)])


def test_lines_over_the_sequence_limit_are_errors(smollm_renderer: Renderer) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    examples = parse_lines(lines(GOOD, long))
    encoded, errors = smollm_renderer.encode_all(examples, 128)
    assert [e.line for e in encoded] == [1]
    assert len(errors) == 1 and errors[0].line == 2
    assert "over the sequence limit of 128" in errors[0].reason


def test_tools_render_as_the_server_renders_them(smollm_renderer: Renderer) -> None:
    tools = [{"type": "function", "function": {"name": "get_code", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_code", "arguments": "{}"}}
    example = parse_lines(
        lines(
            {
                "messages": [
                    {"role": "user", "content": "Code?"},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                ],
                "tools": tools,
            }
        )
    )[0]
    pieces = smollm_renderer.chat_texts(example.chat)  # type: ignore[arg-type]
    assert "<tools>" in pieces[0][0] and "get_code" in pieces[0][0]
    assert pieces[1][1] and pieces[1][0].startswith('<tool_call>\n{"name": "get_code", "arguments": {}}')


def test_config_refuses_bad_names_and_modules() -> None:
    with pytest.raises(ValueError, match="adapter name"):
        TuneConfig(base="x", name="../evil")
    with pytest.raises(ValueError, match="unsupported target modules lm_head"):
        TuneConfig(base="x", name="ok", target_modules=["q_proj", "lm_head"])
    assert TuneConfig(base="x", name="ok", target_modules=["all-linear"]).target_modules[-1] == "down_proj"


def test_lora_dir_setting_and_nim_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MICROSERVE_LORA_DIR", raising=False)
    monkeypatch.setenv("MICROSERVE_CACHE", str(tmp_path))
    assert Settings().resolved_lora_dir() == tmp_path / "loras"
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(tmp_path / "nim"))
    assert Settings().resolved_lora_dir() == tmp_path / "nim"
    monkeypatch.setenv("MICROSERVE_LORA_DIR", str(tmp_path / "ours"))
    assert Settings().resolved_lora_dir() == tmp_path / "ours"


def test_tune_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from microserve.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    result = CliRunner().invoke(app, ["tune", "data.jsonl", "--name", "x"])
    assert result.exit_code == 2
    assert "needs the `tune` extra (peft missing): pip install 'microserve[tune]'" in result.output
