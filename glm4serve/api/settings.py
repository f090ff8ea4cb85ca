"""Server settings: CLI flags > GLM4SERVE_* environment > YAML file (`config`) > defaults.

ServerSettings is the engine's EngineArgs plus the HTTP server's own fields. Each field is a YAML
key and a GLM4SERVE_<NAME> variable (pydantic-settings) and a `glm4serve serve --<name>` flag
(cli.py derives them from these fields, their types and descriptions).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from glm4serve.chat.template import load_chat_template
from glm4serve.engine.config import EngineArgs, json_object, parse_bytes
from glm4serve.model.tokenizer import SAMPLING_DEFAULT_KEYS, read_sampling_defaults

log = logging.getLogger("glm4serve")


# vLLM settings that a command line or config file written for vLLM may carry, and that change nothing
# here: taken, and the log says why (name -> whether its flag takes a value, why it changes nothing).
VLLM_SETTINGS_WITHOUT_EFFECT = {
    "trust_remote_code": (False, "GLM-4 runs on glm4serve's own model code, never on a checkpoint's"),
    "enable_lora": (False, "adapters are served with --lora-modules or --allow-runtime-lora-updating"),
    "max_lora_rank": (True, "adapters of any rank are served"),
    "max_loras": (True, "a batch holds requests of any number of adapters"),
    "enable_auto_tool_choice": (False, "GLM-4's tool calls are parsed whenever a request gives tools"),
    "tool_call_parser": (True, "GLM-4's tool calls are parsed by glm4serve's own parser"),
    "enable_chunked_prefill": (False, "prefill is always chunked (--max-num-batched-tokens)"),
    "disable_log_requests": (False, "no request's prompt or reply is ever logged"),
}


class _YamlSettings(YamlConfigSettingsSource):
    """The config file's keys as ours: vLLM's config files write them as its flags (max-model-len), and
    may carry its settings that change nothing here (dropped, and logged)."""

    def _read_file(self, file_path) -> dict[str, Any]:
        import yaml

        try:
            data = super()._read_file(file_path)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {str(file_path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(file_path)!r} must hold a mapping of settings, not a "
                             f"{type(data).__name__}")
        data = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}
        for name in VLLM_SETTINGS_WITHOUT_EFFECT.keys() & data.keys():
            del data[name]
            log.info("%s (vLLM's) in %s has no effect here: %s", name, file_path,
                     VLLM_SETTINGS_WITHOUT_EFFECT[name][1])
        return data


class ServerSettings(EngineArgs, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLM4SERVE_", extra="forbid", protected_namespaces=(), frozen=True)

    host: str = Field("127.0.0.1", description="bind address")
    num_replicas: int = Field(1, ge=1, description="engine replicas behind this server, each its own model and KV "
                                                   "cache, on Ray Serve (1: one process, no Ray)")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting a local one "
                                                       "(runs the replicated server even with one replica)")
    port: int = Field(8000, ge=0, le=65535, description="port")
    served_model_name: str | None = Field(
        None, description="model id clients send and /v1/models lists (default: a hub id as given, as vLLM's, "
                          "a local folder's name); "
                          "several, space-separated, as vLLM's: requests may name any, replies name the first",
        json_schema_extra={"several": True})
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on every route but /health, "
                                  "/ping, /metrics and /version")
    sse_ping_seconds: float = Field(
        15.0, ge=0, description="keep-alive interval on streams: an SSE comment, and on the Responses and Messages "
                                "APIs their own event (response.in_progress, ping) when the stream brought none "
                                "(0 = off)")
    graceful_shutdown_seconds: float = Field(30.0, ge=0, description="time in-flight requests get on SIGTERM")
    max_waiting_requests: int = Field(
        256, ge=0, description="requests that may queue beyond the running batch; more get 429 at once")
    request_timeout_seconds: float | None = Field(
        None, gt=0, description="stop a request after this long (408, or an error event when streaming; "
                                "default: no limit)")
    # Request limits (400 past them; 413 for the body): guards against one request taking the server.
    max_request_body_bytes: int = Field(16 * 1024**2, description="largest request body, bytes or like 16MiB (413)")
    max_messages: int = Field(2048, ge=1, description="most messages in one chat request")
    max_n: int = Field(16, ge=1, description="most choices (n) in one request")
    max_prompts: int = Field(64, ge=1, description="most prompts in one /v1/completions request")
    max_tokens_limit: int | None = Field(None, ge=1, description="cap on max_tokens (default: the context length)")
    chat_template: str | None = Field(
        None, description="a Jinja chat template, or a file holding one, for every chat request instead of the "
                          "checkpoint's (vLLM's --chat-template; default: the checkpoint's, else glm-4-9b-chat's)")
    reasoning_parser: Literal["deepseek_r1"] | None = Field(
        None, description="chat replies' thinking, up to </think> (GLM-Z1), as reasoning_content, as vLLM's "
                          "--reasoning-parser deepseek_r1 (default: off, all of a reply is content)")
    generation_config: str = Field(
        "auto", description="the sampling defaults of requests that leave them out, as vLLM's: auto (the "
                            "checkpoint's generation_config.json), vllm (none: the API's own), or a folder "
                            "holding a generation_config.json")
    override_generation_config: Annotated[dict, NoDecode] = Field(
        default_factory=dict, description="sampling defaults set over those, as vLLM's: a JSON object like "
                                          f"{{\"temperature\": 0.6}}, of {', '.join(SAMPLING_DEFAULT_KEYS)}")
    max_tools: int = Field(128, ge=0, description="most tools in one chat request")
    exclude_tools_when_tool_choice_none: bool = Field(
        False, description="tool_choice none: leave the tools out of the prompt (default: as vLLM, the model still "
                           "sees them, and no reply is parsed as a call)")
    return_tokens_as_token_ids: bool = Field(
        False, description="logprobs name tokens 'token_id:{id}', not by their text, unless a request says "
                           "otherwise (vLLM's)")
    max_stop: int = Field(16, ge=0, description="most stop strings (and vLLM bad_words) in one request")
    disable_log_stats: bool = Field(
        False, description="no periodic log line of the engine's throughput, requests and caches (vLLM's)")
    response_store_memory: int = Field(
        64 * 1024**2, description="memory for /v1/responses replies kept for previous_response_id and GET "
                                  "/v1/responses/{id}, bytes or like 64MiB; least recently used go first (0 = keep none)")
    conversation_store_memory: int = Field(
        64 * 1024**2, description="memory for /v1/conversations and their items, bytes or like 64MiB; least "
                                  "recently used go first (0 = keep none)")
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS, or '*' (default: CORS off)")
    config: str | None = Field(
        None, description="YAML file with any of these settings (CLI > env > YAML > defaults)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the log's verbosity (debug: where a startup error came from, too)")

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v):
        """The template itself from here on (read and parsed once, at start)."""
        return None if v is None else load_chat_template(v)

    @field_validator("generation_config")
    @classmethod
    def _generation_config(cls, v):
        if v not in ("auto", "vllm") and not (Path(v).expanduser() / "generation_config.json").is_file():
            raise ValueError(f"generation_config is auto, vllm or a folder holding a generation_config.json, "
                             f"not {v!r}")
        return v

    @field_validator("override_generation_config", mode="before")
    @classmethod
    def _override_generation_config(cls, v):
        v = json_object("override_generation_config", v)
        if unknown := sorted(v.keys() - set(SAMPLING_DEFAULT_KEYS)):
            raise ValueError(f"override_generation_config sets {', '.join(SAMPLING_DEFAULT_KEYS)}, not {unknown}")
        from .schemas import CompletionRequest  # a default may be what a request may send (strict: numbers only)

        try:
            CompletionRequest.model_validate({"prompt": "", **v})
        except ValidationError as e:
            error = e.errors()[0]
            raise ValueError(f"override_generation_config's {error['loc'][-1]}: {error['msg']}") from None
        return v

    def sampling_defaults(self, checkpoint: dict) -> dict:
        """What a request leaves out of temperature, top_p, ...: the checkpoint's generation_config.json
        (`checkpoint`), or another folder's, or none (generation_config), under override_generation_config."""
        if self.generation_config == "auto":
            base = checkpoint
        elif self.generation_config == "vllm":
            base = {}
        else:
            base = read_sampling_defaults(Path(self.generation_config).expanduser())
        return {**base, **self.override_generation_config}

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v):
        if v is not None and not v.strip():  # GLM4SERVE_API_KEY= in an .env: never a silently open server
            raise ValueError("api_key is empty: give the key clients must send, or leave it unset for none")
        return v

    @field_validator("response_store_memory", "conversation_store_memory", mode="before")
    @classmethod
    def _store_size(cls, v):
        return 0 if v in (0, "0") else parse_bytes(v)

    @field_validator("max_request_body_bytes", mode="before")
    @classmethod
    def _body_size(cls, v):
        return parse_bytes(v)

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _origins(cls, v):
        # The CLI and the env give a string: a JSON list or "https://a.example,https://b.example".
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _served_names(cls, v):
        names = v.split() if isinstance(v, str) else v  # --served-model-name a b gives a list
        if names is not None and (not isinstance(names, list) or not names
                                  or not all(isinstance(n, str) and n.strip() for n in names)):
            raise ValueError("served_model_name needs one or more names")
        return None if names is None else " ".join(names)

    @property
    def model_name(self) -> str:
        """The model id replies name and /v1/models lists first: a hub id as given (what clients written
        for `vllm serve THUDM/glm-4-9b-chat` send), a local checkpoint by its folder's name."""
        if self.served_model_name:
            return self.served_model_name.split()[0]
        if not self.model:
            return "glm4-demo"
        local = self.model.startswith(("/", "~", ".")) or Path(self.model).expanduser().exists()
        return Path(self.model).expanduser().resolve().name if local else self.model  # `serve .` too

    @property
    def model_aliases(self) -> list[str]:
        """The other names requests may give the served model (served_model_name's after the first)."""
        return self.served_model_name.split()[1:] if self.served_model_name else []

    @model_validator(mode="after")
    def _lora_names(self):
        for name in (self.model_name, *self.model_aliases):
            if name in self.lora_modules:
                raise ValueError(f"a LoRA adapter is named {name!r}, as the served model: rename one "
                                 "(served_model_name)")
        if self.allow_runtime_lora_updating and self.num_replicas > 1:
            raise ValueError("allow_runtime_lora_updating needs one engine: with replicas, list the adapters in "
                             "lora_modules (a replica Ray restarts would come back without those loaded later)")
        return self

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
                raise FileNotFoundError(f"config file {path!r} " + ("is a directory" if os.path.isdir(path)
                                                                     else "does not exist"))
            sources.append(_YamlSettings(settings_cls, yaml_file=path))
        return tuple(sources)
