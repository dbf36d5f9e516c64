"""Several replicas' Prometheus metrics as one scrape: each sample labelled with its replica, each metric family
kept in one group as the text format requires."""

from __future__ import annotations

from collections.abc import Iterable


def _labelled(line: str, label: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        comma = "" if line[brace + 1] == "}" else ","
        return f'{line[: brace + 1]}{label}="{escaped}"{comma}{line[brace + 1 :]}'
    return f'{line[:space]}{{{label}="{escaped}"}}{line[space:]}'


def merge(expositions: Iterable[tuple[str, str]], label: str = "replica") -> str:
    """Merge ``(replica, text)`` pairs of Prometheus text exposition into one text.

    Samples gain a ``label`` (``replica``) naming their replica; ``# HELP``/``# TYPE`` lines appear once per
    family, followed by every replica's samples of it, families in the order they first appear.
    """
    families: dict[str, tuple[list[str], list[str]]] = {}
    for replica, text in expositions:
        current: str | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    current = parts[2]
                    headers, _ = families.setdefault(current, ([], []))
                    if line not in headers:
                        headers.append(line)
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            # A histogram's _bucket/_sum/_count samples belong to the family its TYPE line named.
            family = current if current is not None and name.startswith(current) else name
            families.setdefault(family, ([], []))[1].append(_labelled(line, label, replica))
    out: list[str] = []
    for headers, samples in families.values():
        out += headers
        out += samples
    return "\n".join(out) + "\n"
