"""Whether the training stack (the ``tune`` extra) is installed, checked without importing it."""

from __future__ import annotations

import importlib.util

TUNE_MODULES = ("peft", "accelerate", "matplotlib")


def missing_extra(subject: str) -> str | None:
    """The message naming the ``tune`` extra when a module of it is missing (``subject`` needs it), else None."""
    missing = [m for m in TUNE_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"{subject} needs the `tune` extra ({', '.join(missing)} missing): pip install 'microserve[tune]'"
