"""The layers import downward only: a parse of every module's imports fails on a forbidden edge or a cycle.

docs/architecture.md draws the layers; this test is what keeps the drawing true.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "microserve"
ENGINE_LIBRARIES = ("llama_cpp", "onnxruntime", "vllm", "torch", "transformers", "tokenizers", "peft", "ray")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module (or its package), dotted
    runtime: bool  # at module level, outside `if TYPE_CHECKING:`


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, is_package: bool) -> Iterator[Edge]:
    def visit(nodes: list[ast.stmt], runtime: bool) -> Iterator[Edge]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Edge(module, alias.name, runtime)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    # `from microserve.x import y` may name a submodule y; record both, the submodule when it is one.
                    candidate = f"{base}.{alias.name}"
                    yield Edge(module, candidate if _exists(candidate) else base, runtime)
            elif isinstance(node, ast.If):
                inner = runtime and not _is_type_checking(node)
                yield from visit(node.body, inner)
                yield from visit(node.orelse, runtime)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from visit(node.body, False)  # imported when called: an edge, never an import-time cycle
            elif isinstance(node, (ast.Try, ast.With)):
                for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    yield from visit(block, runtime)
                for handler in getattr(node, "handlers", []):
                    yield from visit(handler.body, runtime)

    yield from visit(tree.body, True)


def _exists(dotted: str) -> bool:
    if not dotted.startswith("microserve."):
        return False
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _edges() -> list[Edge]:
    edges: list[Edge] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges += _imports(tree, _module_name(path), path.name == "__init__.py")
    return edges


EDGES = _edges()


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(source_prefix: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{e.source} imports {e.target}"
        for e in EDGES
        if _within(e.source, source_prefix)
        and any(_within(e.target, f) for f in forbidden)
        and not any(_within(e.target, a) for a in allowed)
    ]


def test_the_parse_sees_the_package() -> None:
    sources = {e.source for e in EDGES}
    assert {"microserve.services.chat", "microserve.engines.llamacpp.engine", "microserve.catalog.plan"} <= sources
    assert Edge("microserve.engines.llamacpp.engine", "llama_cpp", True) in EDGES


@pytest.mark.parametrize(
    ("layer", "forbidden", "allowed"),
    [
        (
            "microserve.services",
            (*ENGINE_LIBRARIES, "microserve.server", "microserve.engines", "microserve.catalog", "microserve.cli"),
            ("microserve.engines.base",),
        ),
        (
            "microserve.engines",
            (
                "microserve.services",
                "microserve.server",
                "microserve.observability",
                "microserve.catalog",
                "microserve.protocol",
                "microserve.cli",
            ),
            (),
        ),
        (
            "microserve.catalog",
            (
                "microserve.server",
                "microserve.services",
                "microserve.observability",
                "microserve.engines",
                "microserve.cli",
            ),
            ("microserve.engines.registry",),
        ),
        (
            "microserve.observability",
            ("microserve.services", "microserve.server", "microserve.catalog", "microserve.engines", "microserve.cli"),
            ("microserve.engines.base",),
        ),
        ("microserve.protocol", ("microserve",), ("microserve.protocol",)),
        ("microserve.server", ("microserve.cli", *ENGINE_LIBRARIES), ()),
    ],
)
def test_layers_import_downward_only(layer: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    assert _violations(layer, forbidden, allowed) == []


def test_the_catalog_flows_manifest_then_profiles_and_store_then_resolve_then_plan() -> None:
    order = {
        "microserve.catalog.manifest": 0,
        "microserve.catalog.profiles": 1,
        "microserve.catalog.store": 1,
        "microserve.catalog.resolve": 2,
        "microserve.catalog.plan": 3,
    }
    upward = [
        f"{e.source} imports {e.target}"
        for e in EDGES
        if e.source in order and e.target in order and order[e.target] >= order[e.source] and e.source != e.target
    ]
    assert upward == []


def test_only_the_engine_table_spells_engine_names() -> None:
    # An engine's name in code outside the table and the engine's own package is a second place that knows it.
    names = ("llamacpp", "vllm", "encoder")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module == "microserve.engines.registry" or _within(module, "microserve.engines"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{module}:{node.lineno} {node.value!r}")
    assert offenders == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        if e.runtime and e.target.startswith("microserve"):
            graph.setdefault(e.source, set()).add(e.target)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    assert cycles == []
