"""OpenAI's published OpenAPI document (tests/data/openai-openapi, MIT) as JSON Schema validators.

The document is OpenAPI 3.1 but still marks some fields with 3.0's ``nullable: true``; those become ``null``
alternatives here, which is what the keyword means. Nothing else is changed, except where a test names it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[1] / "data" / "openai-openapi" / "openapi.yaml"


def _with_nulls(node: Any) -> Any:
    """``nullable: true`` rewritten as JSON Schema: the value may also be null."""
    if isinstance(node, list):
        return [_with_nulls(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _with_nulls(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAI document with its nullable fields made JSON Schema."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open(encoding="utf-8") as handle:
        raw = yaml.load(handle, Loader=loader)
    result: dict[str, Any] = _with_nulls(raw)
    return result


def validator(name: str, patch: Any = None) -> jsonschema.Draft202012Validator:
    """A validator of ``components.schemas[name]``; ``patch(doc)`` may amend a copy of the document first."""
    doc = document()
    if patch is not None:
        doc = copy.deepcopy(doc)
        patch(doc)
    registry: Registry = Registry().with_resource("urn:openai", Resource(contents=doc, specification=DRAFT202012))
    schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def errors(validate: jsonschema.Draft202012Validator, instance: Any) -> list[str]:
    """Every way ``instance`` fails the schema, as readable lines (empty: it conforms)."""
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in validate.iter_errors(instance)
    ]
