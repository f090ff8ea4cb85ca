"""The plain-data seams of the engine: what a request asks for and what it streams back.

The API layer builds a `SamplingParams`, calls `engine.generate(prompt_ids, params)` and reads
an async stream of `Output` items, one per choice per step in which that choice moved. A constrained
request carries a `GuidedSpec` (what its reply must look like), which guided.py compiles.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields

# finish reasons
STOP = "stop"  # a stop token or stop string
LENGTH = "length"  # max_tokens or the model's context
ABORT = "abort"  # abort(request_id), client disconnect, timeout
ERROR = "error"  # the request failed (never sent in an Output: its stream raises)


# Logits divided by a smaller temperature overflow float32 (1e-45 is a subnormal that rounds to 0:
# inf and NaN rows); vLLM raises it to this floor too. 0 means greedy.
MIN_TEMPERATURE = 0.01
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off (multiplicative, over prompt + output tokens)
    presence_penalty: float = 0.0  # additive, over output tokens
    frequency_penalty: float = 0.0  # additive per occurrence, over output tokens
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM's)
    # vLLM's bad_words as token sequences: a sequence's last token is banned where the output so far ends
    # with the rest of it
    bad_words_token_ids: list[list[int]] | None = None
    seed: int | None = None
    logprobs: int | None = None  # None = off; k >= 0: chosen token's logprob + k top alternatives
    # None = off; k >= 0: each prompt token's logprob (the model's raw distribution) + k top alternatives
    prompt_logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # extra stop ids, on top of the model's own (GLM-4: its three)
    ignore_eos: bool = False  # ignore the model's stop tokens (explicit stop_token_ids still stop)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # these special tokens decode as the given text, skipped or not (api/chat.py: the separator of tool calls)
    special_token_text: dict[int, str] | None = None
    guided: GuidedSpec | None = None  # structured output: the grammar the reply must follow (guided.py)
    priority: int = 0  # vLLM's: under the priority scheduling policy, lower values are served first
    # chat: the "\n" that opens a GLM-4 reply (its empty metadata line, which the API leaves out of the
    # content) is passed on as text but no stop string can match it: `stop: "\n"` stops after a line
    stops_skip_leading_newline: bool = False
    lora: str | None = None  # the LoRA adapter to run with (the request's `model` names it); None: the base model
    cache_salt: str | None = None  # vLLM's: only requests with the same salt share prefix-cached blocks

    def __post_init__(self):
        if self.top_k < 0:
            self.top_k = 0
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first
    rank: int | None = None  # of token_id in the distribution, 1 = likeliest (prompt logprobs)


@dataclass
class Output:
    """What one choice of a request did in one engine step (a delta, never the whole text)."""

    request_id: str
    index: int  # choice index, 0..n-1
    token_ids: list[int]  # new token ids of this step (stop tokens included, as generated)
    text: str  # new text, valid UTF-8, stop strings and held-back prefixes excluded
    logprobs: list[TokenLogprob] | None = None  # one per new token when asked for
    # on a choice's first Output, when asked for: one per prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None  # None until the choice's last Output: stop | length | abort
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # this choice's total so far
    # this choice's group's (scheduler.py: choice 0's group computes the prompt; those past max_num_seqs queue after)
    num_cached_tokens: int = 0  # of the prompt's tokens, those read from the prefix cache
    num_cache_write_tokens: int = 0  # and those it adds to the prefix cache (its full blocks past the hit)
    queue_time: float | None = None  # seconds from arrival to its group's first admission (its choices fork then)


class EngineError(RuntimeError):
    """The engine failed this request (the loop keeps serving the others)."""


class ConstraintError(EngineError):
    """The request's own constraint left its reply no token to write: the request's fault, not the server's."""


# upper bounds of the buckets that count engine steps by their tokens (vLLM's iteration_tokens_total)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health; counters are totals since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    spec_draft_tokens: int = 0  # speculative decoding: tokens drafted
    spec_accepted_tokens: int = 0  # of those, tokens the sampler kept
    # steps run, by their tokens: one count per STEP_TOKEN_BUCKETS bound and one past the last; their tokens
    step_token_counts: tuple[int, ...] = (0,) * (len(STEP_TOKEN_BUCKETS) + 1)
    step_tokens: int = 0
    alive: bool = True

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @classmethod
    def total(cls, replicas: Iterable[EngineStats], alive: bool = True) -> EngineStats:
        """Several engine replicas' stats added up."""
        total = cls(alive=alive)
        for s in replicas:
            for f in fields(cls):
                if f.name == "step_token_counts":
                    total.step_token_counts = tuple(map(sum, zip(total.step_token_counts, s.step_token_counts)))
                elif f.name != "alive":
                    setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
        return total


# ---- constraints on a reply (structured output; compiled by guided.py) ----

JSON_OBJECT = "json_object"
JSON_SCHEMA = "json_schema"
TOOL_CALL = "tool_call"
REGEX = "regex"
CHOICE = "choice"
GRAMMAR = "grammar"
KINDS = (JSON_OBJECT, JSON_SCHEMA, TOOL_CALL, REGEX, CHOICE, GRAMMAR)


class GuidedSpecError(ValueError):
    """The grammar engine cannot compile this spec (the request is refused, never the engine)."""


@dataclass(frozen=True)
class GuidedSpec:
    """What a constrained reply must look like. Schemas are JSON text, so a spec is hashable (the
    compiled-grammar cache key) and keeps the schema's property order (the generation order)."""

    kind: str  # one of KINDS
    schema: str | None = None  # JSON_SCHEMA: the JSON schema; REGEX: the pattern; GRAMMAR: the EBNF
    tools: tuple[tuple[str, str], ...] = ()  # TOOL_CALL: (name, parameters schema), one is called
    choices: tuple[str, ...] = ()  # CHOICE: the reply is one of these
    # TOOL_CALL: or else a reply of this spec (tool_choice auto with a response_format: a call or the format)
    otherwise: GuidedSpec | None = None
    # TOOL_CALL: the token that may start another call once one is whole (GLM-4's `<|assistant|>`); None: one call
    call_separator: int | None = None
    # all but TOOL_CALL: GLM-4 opens a chat reply with "\n" (the API strips it). JSON never starts with one, so
    # there it is optional; before a pattern, choice or grammar that may, it is required, so that the one
    # the API strips is never the reply's own
    leading_newline: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GuidedSpecError(f"unknown constraint kind {self.kind!r}")
        if self.kind in (JSON_SCHEMA, REGEX, GRAMMAR) and self.schema is None:
            raise GuidedSpecError(f"a {self.kind} constraint needs its text")
        if self.kind == TOOL_CALL and not self.tools:
            raise GuidedSpecError("a tool_call constraint needs at least one tool")
        if self.kind == CHOICE and (not self.choices or not all(self.choices)):
            raise GuidedSpecError("a choice constraint needs one or more non-empty strings")

    @property
    def requires_newline(self) -> bool:
        """The reply must open with GLM-4's "\\n" (optional before JSON, which never starts with one)."""
        return self.leading_newline and self.kind not in (JSON_OBJECT, JSON_SCHEMA)

    @classmethod
    def json_object(cls, leading_newline: bool = False) -> "GuidedSpec":
        return cls(JSON_OBJECT, leading_newline=leading_newline)

    @classmethod
    def json_schema(cls, schema: dict, leading_newline: bool = False) -> "GuidedSpec":
        return cls(JSON_SCHEMA, schema=json.dumps(schema, ensure_ascii=False), leading_newline=leading_newline)

    @classmethod
    def regex(cls, pattern: str, leading_newline: bool = False) -> "GuidedSpec":
        return cls(REGEX, schema=pattern, leading_newline=leading_newline)

    @classmethod
    def choice(cls, choices: list[str], leading_newline: bool = False) -> "GuidedSpec":
        return cls(CHOICE, choices=tuple(choices), leading_newline=leading_newline)

    @classmethod
    def grammar(cls, ebnf: str, leading_newline: bool = False) -> "GuidedSpec":
        return cls(GRAMMAR, schema=ebnf, leading_newline=leading_newline)

    @classmethod
    def tool_call(cls, tools: dict[str, dict | None], otherwise: GuidedSpec | None = None,
                  call_separator: int | None = None) -> "GuidedSpec":
        """tools: name -> its parameters schema (None: any JSON object); otherwise: what the reply may be
        instead of a call; call_separator: the token that may start another call after each."""
        return cls(TOOL_CALL, tools=tuple((name, json.dumps(params or {"type": "object"}, ensure_ascii=False))
                                          for name, params in tools.items()), otherwise=otherwise,
                   call_separator=call_separator)


# A JSON Schema's keywords whose value maps names to subschemas, and those whose value holds none
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_NOT_SCHEMAS = frozenset({"enum", "const", "default", "examples", "required", "title", "description"})


def schema_nodes(schema) -> Iterator[dict]:
    """Every schema object of a JSON Schema, itself first; not the maps of names (properties, $defs) nor values
    (enum's, const's), so a property named "pattern" is no keyword."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            yield node
            for key, value in node.items():
                if key in _SCHEMA_MAPS and isinstance(value, dict):
                    stack.extend(value.values())
                elif key not in _NOT_SCHEMAS:
                    stack.append(value)
