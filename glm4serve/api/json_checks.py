"""Checks of the JSON a request carries, each a 400 naming the field at fault (`invalid`): a JSON
Schema's validity, and whether the grammar engine can hold a reply to it; a body's nesting and lone
UTF-16 surrogates, which would fail deep inside the server instead.

A schema is checked against its draft's meta-schema in pure Python, ~1.5 us a byte: 128 tools of
100 KB take ~40 s. So the schemas are checked by the route in a worker thread (`schema_problem`, each
request model's `schemas()`), not while the body is parsed on the event loop, which every other
request and the health probes wait on.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from pydantic_core import PydanticCustomError

from glm4serve.engine.types import schema_nodes

# Nesting of the request body's JSON: far beyond any real request (a tool's parameters schema at
# depth 5 keeps ~30 levels of nested objects), well short of where validating or compiling a
# schema recurses past Python's stack.
MAX_JSON_DEPTH = 64
_SCALARS = frozenset({int, float, bool, type(None)})
_SURROGATE = re.compile("[\ud800-\udfff]")


def invalid(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_request", message, {"param": param})


def schema_problem(schemas: list[tuple[Any, str, bool]]) -> tuple[str, str] | None:
    """(param, message) of the first of `schemas` ((schema, its param, whether it constrains a reply))
    that is not a valid JSON Schema or, constraining a reply, uses what the grammar cannot hold it to."""
    for schema, param, constrains in schemas:
        try:
            check_json_schema(schema, param)
            if constrains:
                check_enforceable(schema, param)
        except PydanticCustomError as e:
            return e.context["param"], e.message()
    return None


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming what is wrong when `schema` is not a valid JSON Schema (by its own $schema
    draft, 2020-12 when it names none)."""
    from jsonschema.exceptions import SchemaError

    text = json.dumps(schema, sort_keys=True)
    try:
        # agents send the same tools with every turn, and a check takes milliseconds
        if len(text) <= _SCHEMA_CACHE_MAX_CHARS:
            _check_schema_text(text)
        else:
            _check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise invalid(param, f"{param} is not a valid JSON Schema: {e.message}"
                             + (f" (at '{where}')" if where else "")) from None


_SCHEMA_CACHE_MAX_CHARS = 1 << 16  # larger schemas are checked each time: the cache stays under ~64 MB

# Keywords the grammar engine (xgrammar) passes over: a reply could break them, so a schema that
# constrains a reply may not use them. uniqueItems is passed over too but allowed: pydantic writes it
# for sets, and a duplicate there only shrinks the set. More are held only in part (`_partly`): allOf to
# its first schema, multipleOf on integers alone, pattern without lookarounds, minLength and maxLength without a
# pattern beside them.
_UNENFORCED = frozenset({"not", "if", "then", "else", "contains", "minContains", "maxContains", "dependentRequired",
                         "dependentSchemas"})
_LOOKAROUND = re.compile(r"(?<!\\)(?:\\\\)*\(\?<?[=!]")  # an unescaped (?= (?! (?<= or (?<!


def check_enforceable(schema: Any, param: str) -> None:
    """A 400 when a schema that constrains a reply uses a keyword the grammar cannot hold it to."""
    found: set[str] = set()
    for node in schema_nodes(schema):
        for key, value in node.items():
            if key in _UNENFORCED:
                found.add(key)
            found.update(_partly(node, key, value))
    if found:
        raise invalid(param, f"{param} uses {', '.join(sorted(found))}, which the grammar engine cannot enforce "
                             "on a reply")


def _partly(node: dict, key: str, value: Any) -> list[str]:
    if key == "allOf" and isinstance(value, list) and len(value) > 1:
        return ["allOf of several schemas"]  # pydantic's allOf holds one $ref
    if key == "multipleOf" and node.get("type") != "integer":
        return ["multipleOf on numbers that are not integers"]
    # the grammar engine passes over a lookaround in a schema's pattern (a regex of its own it refuses)
    patterns = [value] if key == "pattern" else list(value) if key == "patternProperties" and isinstance(
        value, dict) else []
    if any(isinstance(p, str) and _LOOKAROUND.search(p) for p in patterns):
        return ["a lookaround in a pattern"]
    if key in ("minLength", "maxLength") and "pattern" in node:
        return [f"{key} beside a pattern"]  # the grammar engine holds the string to the pattern alone
    return []


def _check_schema(schema: Any) -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft202012Validator, validator_for

    # validator_for looks the draft up by $schema as it is: any other type would raise there, not SchemaError
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise SchemaError("$schema must be a string, the URI of a JSON Schema draft", path=("$schema",))
    validator_for(schema, default=Draft202012Validator).check_schema(schema)


@lru_cache(maxsize=1024)
def _check_schema_text(text: str) -> None:
    """_check_schema of a schema as JSON text; remembers the valid ones (SchemaError is not cached)."""
    _check_schema(json.loads(text))


def unfit_json(value: Any, path: tuple = ()) -> tuple[tuple, str] | None:
    """(path, what is wrong) of the first place in a parsed JSON body that no route can take:
    a string with a lone UTF-16 surrogate ("\\ud800" is valid JSON but not Unicode, and UTF-8
    encoders, tokenizers among them, raise on it), or nesting deeper than MAX_JSON_DEPTH."""
    if isinstance(value, str):
        return None if (bad := _lone_surrogate(value)) is None else (path, f"the text contains {bad}")
    if not isinstance(value, (dict, list)):
        return None
    if len(path) >= MAX_JSON_DEPTH:
        return path, f"the request's JSON is nested deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, list) and _SCALARS.issuperset(map(type, value)):
        return None  # a token-id prompt: a million numbers, passed over at C speed
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str) and (bad := _lone_surrogate(key)) is not None:
            return path, f"a key contains {bad}"
        if (found := unfit_json(item, (*path, key))) is not None:
            return found
    return None


def _lone_surrogate(text: str) -> str | None:
    if text.isascii() or (bad := _SURROGATE.search(text)) is None:
        return None
    return f"a lone UTF-16 surrogate ({ascii(bad.group())[1:-1]}), which is not Unicode"
