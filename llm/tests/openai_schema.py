"""Validate JSON against OpenAI's published OpenAPI description (a test helper).

The document is /work/shared/specs/openai-openapi.yaml (openai/openai-openapi, MIT), overridable
with the ``OPENAI_OPENAPI_SPEC`` environment variable. Usage::

    from llm.tests.openai_schema import validate_against
    validate_against("CreateChatCompletionStreamResponse", chunk)  # raises SchemaMismatch

The 3 MB YAML is parsed once per process and every ``$ref`` is resolved through a ``referencing``
registry holding the whole document. OpenAI's file says ``openapi: 3.1.0`` yet still marks
optional-null fields with the 3.0 keyword ``nullable: true`` (``finish_reason``, ``logprobs``,
``usage`` on stream chunks), which a 3.1 validator ignores; ``_load`` rewrites each such schema to
the 3.1 spelling ``anyOf: [<schema>, {type: "null"}]``, so real OpenAI payloads validate.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema.exceptions import ValidationError, best_match
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["SchemaMismatch", "schema_names", "validate_against"]

DEFAULT_SPEC_PATH = Path("/work/shared/specs/openai-openapi.yaml")
# A hierarchical URI (not a URN) so that the document's "#/..." refs join onto it.
_DOCUMENT_URI = "https://spec.openai.invalid/openapi.yaml"


class SchemaMismatch(AssertionError):
    """An instance does not match an OpenAI schema; the message names the path and the rule.

    An ``AssertionError`` so pytest reports it as a failed check, not as an error in the test.
    """


def _spec_path() -> Path:
    return Path(os.environ.get("OPENAI_OPENAPI_SPEC", DEFAULT_SPEC_PATH))


def _nullable_to_31(node: Any) -> Any:
    """Return ``node`` with every OAS 3.0 ``nullable: true`` rewritten as ``anyOf [..., null]``."""
    if isinstance(node, list):
        return [_nullable_to_31(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _nullable_to_31(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@cache
def _load() -> tuple[dict[str, Any], Registry]:
    """Return the (rewritten) OpenAPI document and a registry that resolves refs into it."""
    path = _spec_path()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml parses the 3 MB file ~10x faster
    with path.open(encoding="utf-8") as handle:
        document = _nullable_to_31(yaml.load(handle, Loader=loader))  # noqa: S506 - a safe loader
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    return document, Registry().with_resource(_DOCUMENT_URI, resource)


def schema_names() -> list[str]:
    """Return the names under ``components.schemas`` (e.g. ``CreateChatCompletionResponse``)."""
    return sorted(_load()[0]["components"]["schemas"])


@cache
def _validator(schema_name: str) -> Any:
    document, registry = _load()
    if schema_name not in document["components"]["schemas"]:
        raise KeyError(f"{schema_name!r} is not a schema in {_spec_path()} (see schema_names()).")
    schema = {"$ref": f"{_DOCUMENT_URI}#/components/schemas/{schema_name}"}
    return OAS31Validator(schema, registry=registry, format_checker=oas31_format_checker)


def validate_against(schema_name: str, instance: Any) -> None:
    """Check ``instance`` (parsed JSON) against ``components.schemas[schema_name]``.

    Raises ``SchemaMismatch`` naming the failing path and rule, and ``KeyError`` for an unknown
    schema name. Thread-safe after the first call; the first call parses the YAML (~1 s).
    """
    errors = list(_validator(schema_name).iter_errors(instance))
    if not errors:
        return
    error: ValidationError = best_match(errors)
    where = "/".join(str(part) for part in error.absolute_path) or "<root>"
    raise SchemaMismatch(
        f"{schema_name} mismatch at {where}: {error.message} ({len(errors)} error(s) in total)\n"
        f"instance: {str(instance)[:2000]}"
    )
