"""Legacy completions on both built-in models."""

from __future__ import annotations

from conftest import Server

MODEL = "smollm2-135m-instruct"


def test_completion_usage_matches_tokenizer(smollm: Server, smollm_vocab: object) -> None:
    prompt = "The three primary colours are"
    reply = smollm.client().completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert reply.usage is not None
    expected = len(smollm_vocab.tokenize(prompt.encode(), add_bos=True, special=True))  # type: ignore[attr-defined]
    assert reply.usage.prompt_tokens == expected
    assert 1 <= reply.usage.completion_tokens <= 10
    assert reply.choices[0].text


def test_list_of_prompts_gives_one_choice_each_and_echo(smollm: Server) -> None:
    prompts = ["Once upon a time", "1, 2, 3, 4,", "The best fruit is"]
    reply = smollm.client().completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, echo=True)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        assert choice.text.startswith(prompts[choice.index])
        assert len(choice.text) > len(prompts[choice.index])
    assert reply.usage is not None and reply.usage.completion_tokens == 18


def test_streamed_completion_with_usage(smollm: Server) -> None:
    stream = smollm.client().completions.create(
        model=MODEL,
        prompt="Roses are red,",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_gemma_completion_and_chat(gemma: Server) -> None:
    client = gemma.client()
    reply = client.completions.create(
        model="gemma-3-270m", prompt="The Eiffel Tower is in the city of", max_tokens=8, temperature=0
    )
    assert "Paris" in reply.choices[0].text
    chat = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hi."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
