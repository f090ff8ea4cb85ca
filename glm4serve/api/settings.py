"""Server settings: CLI flags > GLM4SERVE_* environment > YAML file (`config`) > defaults."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(value: int | float | str) -> int:
    """2147483648, "2GiB", "1.5 GB", "512MiB" -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes")
    if isinstance(value, (int, float)):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read {value!r} as a size: use bytes or a unit like 2GiB, 512MiB")
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if size <= 0:
        raise ValueError("a memory size must be positive")
    return int(size)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLM4SERVE_", extra="forbid", protected_namespaces=())

    model: str | None = None  # checkpoint folder; None = the built-in demo model
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(None, ge=1)  # None = the model's own context length
    served_model_name: str | None = None  # None = derived from the model path
    api_key: str | None = None  # None = no authentication on /v1/*
    kv_cache_memory: int | None = None  # bytes for the KV cache; None = the engine decides
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    sse_ping_seconds: float = Field(15.0, ge=0)  # keep-alive comment interval on streams; 0 = off
    graceful_shutdown_seconds: float = Field(30.0, ge=0)  # on SIGTERM, time for in-flight requests
    # Overload: past max_num_seqs running + this many waiting, new requests get 429 at once.
    max_waiting_requests: int = Field(256, ge=0)
    request_timeout_seconds: float | None = Field(None, gt=0)  # engine deadline per request; None = none
    # Request limits (400 past them; 413 for the body): guards against one request taking the server.
    max_request_body_bytes: int = 16 * 1024**2
    max_messages: int = Field(2048, ge=1)
    max_n: int = Field(16, ge=1)  # choices per request
    max_prompts: int = Field(64, ge=1)  # prompts in one /v1/completions request
    max_tokens_limit: int | None = Field(None, ge=1)  # cap on max_tokens; None = the context bounds it
    max_tools: int = Field(128, ge=0)
    max_stop: int = Field(16, ge=0)  # stop strings per request
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)  # [] = CORS off; ["*"] = any origin
    config: str | None = None  # YAML file whose keys fill the fields above

    @field_validator("kv_cache_memory", "max_request_body_bytes", mode="before")
    @classmethod
    def _memory_size(cls, v):
        return None if v is None else parse_bytes(v)

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v):
        # The CLI and the env give a string: a JSON list or "https://a.example,https://b.example".
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML path itself follows the same precedence: a CLI value beats the env variable.
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config") or os.environ.get("GLM4SERVE_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file {path!r} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)
