"""The fixed questions with known answers that bench/quality.py asks each precision, and how an answer is judged.

tests/e2e/test_default_model.py asks the default profile some of them, judged the same way.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    text: str
    accepted: tuple[str, ...]


# README's example first. Kinds: capitals, arithmetic, simple facts, following an instruction.
QUESTIONS = (
    Question("What is the capital of France?", ("paris",)),
    Question("What is the capital of Japan?", ("tokyo",)),
    Question("What is the capital of Italy?", ("rome",)),
    Question("What is the capital of Germany?", ("berlin",)),
    Question("What is the capital of Spain?", ("madrid",)),
    Question("What is the capital of the United Kingdom?", ("london",)),
    Question("What is the capital of Egypt?", ("cairo",)),
    Question("What is 2 + 2?", ("4", "four")),
    Question("What is 5 + 3?", ("8", "eight")),
    Question("What is 10 - 4?", ("6", "six")),
    Question("What is 3 times 4?", ("12", "twelve")),
    Question("What is 9 + 10?", ("19", "nineteen")),
    Question("How many days are there in a week?", ("7", "seven")),
    Question("How many legs does a spider have?", ("8", "eight")),
    Question("What color is the sky on a clear day?", ("blue",)),
    Question("What is the largest planet in our solar system?", ("jupiter",)),
    Question("Which planet is known as the Red Planet?", ("mars",)),
    Question("What is the chemical formula of water?", ("h2o",)),
    Question("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "co2")),
    Question("At how many degrees Celsius does water freeze?", ("0", "zero")),
    Question('Who wrote "Romeo and Juliet"?', ("shakespeare",)),
    Question("What is the opposite of hot?", ("cold",)),
    Question("Reply with only the word hello.", ("hello",)),
    Question('Translate "thank you" into French.', ("merci",)),
    Question("Write the number twelve in digits.", ("12",)),
)


def normalise(text: str) -> str:
    """Lower case, accents dropped, anything but ASCII letters and digits turned into single spaces (so that
    "0°C" reads as "0 c")."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^a-z0-9]+", " ", plain).split())


def is_right(answer: str, accepted: tuple[str, ...]) -> bool:
    """Whether ``answer`` contains one of ``accepted`` as whole words."""
    padded = f" {normalise(answer)} "
    return any(f" {normalise(a)} " in padded for a in accepted)
