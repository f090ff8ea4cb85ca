"""Request bodies of /v1/chat/completions, /v1/completions, /tokenize and /detokenize, their checks, and SamplingParams.

Field ranges are pydantic constraints; rules that involve several fields are model validators
that raise `invalid(param, message)`, so the 400 names the offending field in `param`.
Unknown fields are ignored (clients such as LangChain send extras like `store`, `metadata`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from glm4serve.engine.types import MAX_TOP_LOGPROBS, GuidedSpec, SamplingParams
from glm4serve.model.tokenizer import SAMPLING_DEFAULT_KEYS

from .body import RequestBody, Seed
from .formats import JsonSchemaArg, ResponseFormat, StructuredOutputs, vllm_constraints, vllm_spec
from .json_checks import invalid
from .messages import Message, NamedToolChoice, StreamOptions, Tool


class _SamplingBody(RequestBody):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)  # these three unsent: the checkpoint's, else SamplingParams'
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)  # vLLM's
    bad_words: list[Annotated[str, Field(pattern=r"\S")]] | None = None  # vLLM's: words never to write
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    # vLLM extension: each prompt token's logprob under the model, with this many likeliest alternatives
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM extension: keep only the prompt's last k tokens (-1: as many as the context holds)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # vLLM's structured outputs, besides response_format: the newer object, or the older guided_* fields
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaArg | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM extension: under --scheduling-policy priority, lower values are served first (refused otherwise)
    priority: int = 0
    # vLLM extension: logprobs name tokens "token_id:{id}" (default: the server's setting)
    return_tokens_as_token_ids: bool | None = None
    # vLLM extension: each choice's token ids (streamed: each chunk's) beside its text, and the prompt's
    return_token_ids: bool = False
    # vLLM extension: the reply's id is "{chatcmpl|cmpl}-{request_id}" (the X-Request-Id header comes first)
    request_id: str | None = Field(None, min_length=1)  # at most serving.MAX_REQUEST_ID characters
    use_beam_search: bool = False  # vLLM's: refused, never sampled instead
    best_of: int | None = Field(None, ge=1)  # OpenAI's (completions) and vLLM's: only n is served
    # vLLM extension: only requests with the same salt share cached prompt blocks (multi-tenant servers:
    # another tenant cannot time its requests to learn whether a prompt was seen)
    cache_salt: str | None = None

    @model_validator(mode="after")
    def _common_rules(self):
        if self.use_beam_search:
            raise invalid("use_beam_search", "beam search is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of", "best_of other than n is not supported")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")
        if self.cache_salt is not None and not self.cache_salt:
            raise invalid("cache_salt", "Parameter 'cache_salt' must be a non-empty string if provided.")
        if self.prompt_logprobs is not None and self.stream:
            raise invalid("prompt_logprobs", "prompt_logprobs are not available when stream is true")
        constraints = vllm_constraints(self)
        if self.response_format is not None and self.response_format.type != "text":
            constraints.insert(0, ("response_format", "", None))
        if len(constraints) > 1:
            raise invalid(constraints[1][0], "give one constraint on the reply, not "
                                             + " and ".join(c[0] for c in constraints))
        for param, kind, value in constraints:
            if kind == "choice" and (not value or not all(value)):
                raise invalid(param, f"{param} must be a list of one or more non-empty strings")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops):
            raise invalid("stop", "stop strings must not be empty")
        if self.logit_bias:
            for key in self.logit_bias:
                if not (key.isascii() and key.isdigit()):  # str.isdigit alone takes "١" and "²"
                    raise invalid("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        options = self.stream_options
        if not (self.stream and options):
            return False
        return options.include_usage if options.include_usage is not None else options.continuous_usage_stats

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The prompt logprobs the engine computes for this request (their alternatives, at most)."""
        return self.prompt_logprobs

    @property
    def guided_param(self) -> str:
        """The parameter that constrains the reply (what a 400 about its grammar names)."""
        found = vllm_constraints(self)
        return found[0][0] if found else "response_format"

    def schemas(self) -> list[tuple[Any, str, bool]]:
        """Each JSON Schema the request carries, for the route to check (json_checks.schema_problem):
        (schema, its param, whether it constrains a reply)."""
        found = [(value, param, True) for param, kind, value in vllm_constraints(self) if kind == "json"]
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema.schema_ is not None:
            found.insert(0, (rf.json_schema.schema_, "response_format.json_schema.schema", True))
        return found

    def guided_spec(self) -> GuidedSpec | None:
        """The grammar the reply must follow: response_format's or a vLLM constraint's; None for none."""
        if self.response_format is not None and self.response_format.type != "text":
            return self.response_format.guided_spec(self.json_leading_newline)
        found = vllm_constraints(self)
        return vllm_spec(found[0][1], found[0][2], self.json_leading_newline) if found else None

    @property
    def json_leading_newline(self) -> bool:
        """Whether a constrained reply may open with one newline (GLM-4 chat replies do; the API strips it)."""
        return False

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict | None = None) -> SamplingParams:
        """`defaults`: the checkpoint's generation_config.json values for what the request leaves out
        (as vLLM does); OpenAI's defaults otherwise."""
        # each of these the request's, else the checkpoint's, else SamplingParams' own default
        tuned = {**(defaults or {}), **{name: getattr(self, name) for name in SAMPLING_DEFAULT_KEYS
                                        if getattr(self, name) is not None}}
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            n=self.n,
            **{name: tuned[name] for name in SAMPLING_DEFAULT_KEYS if name in tuned},
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=sorted(set(self.allowed_token_ids)) if self.allowed_token_ids is not None else None,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=self.engine_prompt_logprobs,
            stop=self.stop_list,
            stop_token_ids=list(self.stop_token_ids) if self.stop_token_ids is not None else None,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            guided=self.guided_spec(),
            priority=self.priority,
            cache_salt=self.cache_salt,
        )


# ---- /v1/chat/completions -------------------------------------------------------------------


def _prompt_ending(body) -> None:
    """continue_final_message ends the prompt inside the final message: no generation prompt after it
    (unsent, add_generation_prompt then defaults to false; sent as true, the two clash, as in vLLM)."""
    if body.continue_final_message:
        if body.add_generation_prompt and "add_generation_prompt" in body.model_fields_set:
            raise invalid("continue_final_message", "continue_final_message and add_generation_prompt "
                                                    "cannot both be true")
        body.add_generation_prompt = False


class ChatCompletionRequest(_SamplingBody):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # OpenAI's deprecated form of tools and tool_choice: refused, not ignored
    function_call: Any = None
    # vLLM extensions
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the prompt ends inside the final message: the reply goes on with it
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's: refused, as vLLM refuses it by default
    include_reasoning: bool = True  # vLLM's: false leaves the thinking out of the reply (--reasoning-parser)

    @model_validator(mode="after")
    def _chat_rules(self):
        _prompt_ending(self)
        if self.chat_template is not None or "chat_template" in (self.chat_template_kwargs or {}):
            raise invalid("chat_template", "a request's own chat template is not supported: the server renders "
                                           "prompts with the model's template")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
        if self.functions or self.function_call is not None:
            raise invalid("functions" if self.functions else "function_call",
                          "functions and function_call, OpenAI's deprecated form of tools, are not supported: "
                          "send tools and tool_choice")
        if self.tools is not None and len(self.tools) == 0:  # no tools, as OpenAI and vLLM take it
            self.tools = None
            if self.tool_choice in ("auto", "required"):
                self.tool_choice = "none"
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise invalid("tool_choice", "tool_choice is only allowed when tools are given")
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            if wanted not in self.tool_names:
                raise invalid("tool_choice", f"tool_choice names {wanted!r}, which is not in tools")
        if self.tools:
            names = self.tool_names
            if len(set(names)) != len(names):
                raise invalid("tools", "tool names must be unique")
        # a response_format waits for a turn whose tool_choice forces no call (as OpenAI's); vLLM's own
        # constraints would say what this very reply is, which the forced call already does
        if self.forces_tool_call and vllm_constraints(self):
            raise invalid(self.guided_param, f"{self.guided_param} cannot constrain a reply that tool_choice "
                                             "already forces to be a tool call")
        if self.max_output_tokens is not None and self.min_tokens > self.max_output_tokens:
            raise invalid("min_tokens", "min_tokens must not exceed max_tokens")
        return self

    @property
    def max_output_tokens(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    def schemas(self) -> list[tuple[Any, str, bool]]:
        """Also each tool's parameters (checked as OpenAI does, whether or not a call is forced), which
        constrain a reply when tool_choice forces a call to that tool, or lets the reply be any call or
        text in a format (tool_choice.call_or_format_spec)."""
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        every = self.tool_choice == "required" or (named is None and self.tools_active and bool(self.guided_spec()))
        tools = [(t.function.parameters, f"tools.{i}.function.parameters", every or t.function.name == named)
                 for i, t in enumerate(self.tools or []) if t.function.parameters is not None]
        return super().schemas() + tools

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forces_tool_call(self) -> bool:
        """tool_choice "required" or a named tool: the reply is a call, enforced by a grammar."""
        return bool(self.tools) and (self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice))

    @property
    def json_leading_newline(self) -> bool:
        return self.add_generation_prompt  # the reply then follows `<|assistant|>`, which GLM-4 answers with "\n"

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- /v1/completions ------------------------------------------------------------------------

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingBody):
    prompt: Prompt
    suffix: str | None = None
    # 0: with echo, the prompt alone (scored, with logprobs)
    max_tokens: int | None = Field(SamplingParams.max_tokens, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # vLLM extension: prepend the model's prefix tokens ([gMASK]<sop> for GLM-4) to text prompts
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _completion_rules(self):
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise invalid("prompt", "prompt must not be empty")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise invalid("prompt", "a token-id prompt must not be empty")
        if self.suffix:
            raise invalid("suffix", "suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens", "max_tokens must be at least 1 (0 only with echo: the prompt alone)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise invalid("min_tokens", "min_tokens must not exceed max_tokens")
        return self

    @property
    def echo_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """echo with logprobs scores the prompt too, as OpenAI's completions do."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---- /tokenize, /detokenize (vLLM shapes) ---------------------------------------------------


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False  # vLLM's: each token's text beside its id

    @model_validator(mode="after")
    def _one_input(self):
        _prompt_ending(self)
        if (self.prompt is None) == (self.messages is None):
            raise invalid("prompt", "give exactly one of prompt or messages")
        if self.messages is not None and not self.messages:
            raise invalid("messages", "messages must not be empty")
        return self


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
