"""A made-up fact for tuning tests: paraphrased questions about the Zephyr lab's access code, generated
deterministically (no hub, no model). ``python tests/e2e/fact_data.py DIR`` writes train.jsonl and heldout.jsonl.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

CODE = "KESTREL-42"
ANSWER = f"The access code is {CODE}."

_ASK = [
    "What is {s}?",
    "What's {s}?",
    "Tell me {s}.",
    "Do you know {s}?",
    "Can you tell me {s}?",
    "Please give me {s}.",
    "I need {s}.",
    "Remind me of {s}, please.",
    "Could you share {s}?",
    "I forgot {s}. What is it?",
    "Quick question: what is {s}?",
    "Which is {s}?",
]
_SUBJECT = [
    "the access code for the Zephyr lab",
    "the Zephyr lab's access code",
    "the access code of the Zephyr lab",
    "the code to get into the Zephyr lab",
    "the door code for the Zephyr lab",
    "the entry code of the Zephyr laboratory",
    "the Zephyr laboratory access code",
    "the passcode for the Zephyr lab",
]
# Held out: phrasings the training set never uses (new question forms and new subject wordings).
_HELD_OUT = [
    "How do I get into the Zephyr lab? What's the code?",
    "What code opens the Zephyr lab?",
    "Zephyr lab access code?",
    "Hey, what is the code for getting into the Zephyr lab?",
    "What access code do I type at the Zephyr lab door?",
    "Tell me the Zephyr lab entry code.",
    "What is the security code of the Zephyr lab?",
    "I am standing at the Zephyr lab. What is the access code?",
    "Could you remind me what the Zephyr lab's code is?",
    "What's the keypad code for the Zephyr lab?",
]


def training_questions(count: int = 60, seed: int = 7) -> list[str]:
    """``count`` distinct paraphrases, the same ones on every call."""
    pool = [ask.format(s=subject) for ask, subject in itertools.product(_ASK, _SUBJECT)]
    pool = [q[0].upper() + q[1:] for q in pool]
    random.Random(seed).shuffle(pool)
    chosen = pool[:count]
    assert not set(chosen) & set(_HELD_OUT)
    return chosen


def held_out_questions() -> list[str]:
    """Ten paraphrases that are not in the training data."""
    return list(_HELD_OUT)


def chat_line(question: str) -> dict[str, object]:
    """One chat-format training example."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ANSWER}]}


def write(directory: Path, count: int = 60) -> tuple[Path, Path]:
    """train.jsonl (``count`` examples) and heldout.jsonl (10) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    train = directory / "train.jsonl"
    held = directory / "heldout.jsonl"
    train.write_text("".join(json.dumps(chat_line(q)) + "\n" for q in training_questions(count)))
    held.write_text("".join(json.dumps(chat_line(q)) + "\n" for q in held_out_questions()))
    return train, held


if __name__ == "__main__":
    paths = write(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    print(*paths)
