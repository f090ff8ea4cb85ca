"""The base of every request body: strict types as OpenAI checks them, null as the default, and one check of
the whole body for JSON that would fail deep inside the server."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .json_checks import invalid, unfit_json


class Body(BaseModel):
    """Any part of a request body (the responses and adapter routes build theirs on it too)."""

    # strict: as OpenAI checks them, an integer is no "5", true or 5.0, a number no "0.5"; nor NaN or Infinity
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI's optional fields are nullable, and the SDKs send null for an argument given as None:
        where a field takes no null, null means its default (n=1, stream=false, ...). A field that takes
        null keeps it (completions' max_tokens: null is the rest of the context); a required one stays required."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        defaulted = {name for name, f in cls.model_fields.items()
                     if not f.is_required() and type(None) not in typing.get_args(f.annotation)}
        defaulted |= {cls.model_fields[n].alias for n in defaulted if cls.model_fields[n].alias}
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


class RequestBody(Body):
    """A route's whole body: checked once for what would fail deep inside the server instead."""

    @model_validator(mode="before")
    @classmethod
    def _fit_json(cls, data: Any) -> Any:
        found = unfit_json(data)
        if found is not None:
            path, problem = found
            param = ".".join(str(p) for p in path[:6]) or None
            raise invalid(param, f"{param}: {problem}" if param else problem)
        return data


Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # int64, as vLLM and OpenAI take it
# OpenAI's metadata: at most 16 pairs, keys of at most 64 characters, values of at most 512
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]
