"""The constraints a request may put on its reply's form: OpenAI's response_format, and vLLM's
structured_outputs and guided_* fields, each made into a GuidedSpec for the engine's grammar."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from glm4serve.engine.types import GuidedSpec

from .body import Body
from .json_checks import invalid


class JsonSchemaFormat(Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # accepted; replies always follow the schema (guided.py)


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given_and_valid(self):
        if self.type == "json_schema":
            if self.json_schema is None:
                raise invalid("response_format", "response_format of type json_schema needs a json_schema")
        return self

    def guided_spec(self, leading_newline: bool) -> GuidedSpec | None:
        """The grammar of this format; None for text."""
        if self.type == "json_schema" and self.json_schema.schema_ is not None:
            return GuidedSpec.json_schema(self.json_schema.schema_, leading_newline)
        if self.type in ("json_object", "json_schema"):
            return GuidedSpec.json_object(leading_newline)
        return None


def _parsed_json_text(value: Any) -> Any:
    """A JSON schema sent as JSON text (vLLM takes both), parsed; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise ValueError(f"not valid JSON: {e}") from None


# a JSON schema object, or its JSON text
JsonSchemaArg = Annotated[dict[str, Any], BeforeValidator(_parsed_json_text)]


class StructuredOutputs(Body):
    """vLLM's structured_outputs: one of these constraints on the reply."""

    json_: JsonSchemaArg | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF, in xgrammar's dialect
    json_object: bool | None = None
    structural_tag: Any = None  # not supported: refused, never ignored

    @model_validator(mode="after")
    def _supported(self):
        if self.structural_tag is not None:
            raise invalid("structured_outputs.structural_tag", "structural_tag is not supported")
        return self


def vllm_constraints(body) -> list[tuple[str, str, Any]]:
    """(param, kind, value) of each structured-output constraint the body sets the vLLM way."""
    so = body.structured_outputs
    kinds = ("json", "regex", "choice", "grammar")
    found = [(f"guided_{kind}", kind, getattr(body, f"guided_{kind}")) for kind in kinds]
    if so is not None:
        found += [(f"structured_outputs.{kind}", kind, getattr(so, "json_" if kind == "json" else kind))
                  for kind in kinds]
        found.append(("structured_outputs.json_object", "json_object", so.json_object or None))
    return [f for f in found if f[2] is not None]


def vllm_spec(kind: str, value: Any, leading_newline: bool) -> GuidedSpec:
    if kind == "json":
        return GuidedSpec.json_schema(value, leading_newline)
    if kind == "json_object":
        return GuidedSpec.json_object(leading_newline)
    return {"regex": GuidedSpec.regex, "choice": GuidedSpec.choice, "grammar": GuidedSpec.grammar}[kind](
        value, leading_newline)
