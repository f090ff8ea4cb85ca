"""Structured output: grammar-constrained decoding with xgrammar.

A request's constraint is a `GuidedSpec` on its SamplingParams (plain, hashable data): the reply
is a JSON object, or JSON valid against a schema, or a GLM-4 tool call `{name}\\n{json}` of one of
the given tools (or several, each after the spec's call separator token, or, with tool_choice auto,
one call or a reply of another spec), or (vLLM's structured outputs) text matching a regular
expression, one of a list of strings, or a sentence of an EBNF grammar (xgrammar's dialect, as vLLM
takes it). `Grammars` compiles specs against the model's tokenizer (LRU cache, thread-safe: the API
compiles up front in a worker thread, so a bad schema is a 400 and the engine loop finds the grammar
cached) and makes a `Guide` per sequence: an xgrammar matcher that every sampled token advances.
The sampler has the guides of the constrained rows fill a token bitmask and sets the forbidden
logits of (a copy of) those rows to -inf (`mask_logits`); rows without a guide are never touched,
and a batch without any allocates nothing.

Format decisions:
- JSON is compact, with json.dumps' separators (", " and ": ") and no other whitespace: GLM-4
  writes its tool arguments that way, and a model that may emit whitespace forever (a random
  one does) never finishes.
- Object keys are the schema's properties only, in the schema's order, unless the schema allows
  others (additionalProperties); every reply still validates against the schema, but for
  `uniqueItems`, which xgrammar passes over (the API refuses the other keywords it passes over or holds
  only in part: api/json_checks.py). A string with a `format` and a `pattern`, `minLength` or `maxLength` is
  held to those: xgrammar would hold it to the format alone, and in JSON Schema a format is an annotation,
  the others assertions (zod writes a pattern beside its uuid, email and date formats and checks it;
  pydantic writes lengths beside its URLs' format).
- Special tokens never match the grammar, and neither does any token holding a raw control byte
  other than "\\n": compact JSON needs none, and xgrammar's length-bounded strings would
  otherwise admit a raw tab, which JSON forbids.
- Only well-formed UTF-8: xgrammar takes any continuation byte after a lead byte, so it would let
  a reply spell a surrogate (ED A0..BF ..) or an overlong form, which the detokenizer can only show
  as U+FFFD (three characters where the grammar counted one). Tokens that hold such a sequence, or
  a byte never seen in UTF-8, are hidden; after a lone lead byte E0, ED, F0 or F4 the tokens whose
  first byte is out of its range are masked (`Utf8Rules`).
- Once the grammar is complete only the request's stop tokens are allowed, so a finished reply
  ends with finish_reason "stop"; a reply cut by max_tokens still ends with "length".
- xgrammar is imported (~0.6 s) on the first constrained request, not at start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .types import CHOICE, GRAMMAR, JSON_SCHEMA, REGEX, TOOL_CALL, GuidedSpec, GuidedSpecError, schema_nodes

_SEPARATORS = (", ", ": ")
# xgrammar's messages start with "[HH:MM:SS] /path/to/file.cc:123: "
_LOCATION_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*")


class GuidedDecodingError(RuntimeError):
    """A sequence took a token its grammar forbids (fails that request only)."""


def _clean_message(error: Exception) -> str:
    return _LOCATION_PREFIX.sub("", str(error)).strip() or type(error).__name__


def build_grammar(spec: GuidedSpec):
    """The xgrammar Grammar of a spec (uncompiled)."""
    import xgrammar as xgr

    def json_grammar(schema: str):
        return xgr.Grammar.from_json_schema(_held_over_format(schema), any_whitespace=False,
                                            separators=_SEPARATORS, strict_mode=True)

    if spec.kind == TOOL_CALL:
        # `{name}\n` then the arguments: GLM-4's call format right after <|assistant|>
        calls = []
        for name, params in spec.tools:
            name_line = xgr.Grammar.from_ebnf("root ::= " + json.dumps(name + "\n"))  # a JSON string is an EBNF literal
            calls.append(xgr.Grammar.concat(name_line, json_grammar(params)))
        if spec.otherwise is not None:  # it opens with "\n" or JSON, never a name: the two never overlap
            calls.append(build_grammar(spec.otherwise))
        return calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    if spec.kind == REGEX:
        body = xgr.Grammar.from_regex(spec.schema)
    elif spec.kind == CHOICE:  # JSON strings are EBNF literals
        body = xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices))
    elif spec.kind == GRAMMAR:
        body = xgr.Grammar.from_ebnf(spec.schema)
    else:
        body = json_grammar(spec.schema if spec.kind == JSON_SCHEMA else '{"type": "object"}')
    if spec.leading_newline:
        newline = '"\\n"' if spec.requires_newline else '"\\n"?'
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf("root ::= " + newline), body)
    return body


def _held_over_format(schema: str) -> str:
    """The schema with `format` dropped where a `pattern`, `minLength` or `maxLength` stands beside it (module
    docstring)."""
    if '"format"' not in schema:
        return schema
    parsed = json.loads(schema)
    for node in schema_nodes(parsed):
        if "format" in node and (isinstance(node.get("pattern"), str) or "minLength" in node or "maxLength" in node):
            del node["format"]
    return json.dumps(parsed, ensure_ascii=False)


# Well-formed UTF-8 (Unicode's table 3-7): the second byte after these lead bytes has a narrower
# range than 80..BF (no overlong forms, no surrogates, nothing past U+10FFFF)
SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}
NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


def ill_formed_utf8(b: bytes) -> bool:
    """b holds a byte no UTF-8 text has, or a lead byte followed by an out-of-range second byte."""
    return any(c in NEVER_IN_UTF8 for c in b) or any(
        lead in SECOND_BYTE and not SECOND_BYTE[lead][0] <= nxt <= SECOND_BYTE[lead][1] for lead, nxt in zip(b, b[1:]))


def grammar_vocab(tokenizer) -> list[bytes]:
    """Each token's bytes as the grammar engine sees them: b"" (never allowed) for special tokens,
    for tokens with a raw control byte other than newline, and for ill-formed UTF-8 ones."""
    vocab = []
    for i in range(tokenizer.vocab_size):
        b = tokenizer.token_bytes(i)
        hidden = tokenizer.is_special(i) or any(c < 0x20 and c != 0x0A for c in b) or ill_formed_utf8(b)
        vocab.append(b"" if hidden else b)
    return vocab


def utf8_tail(data: bytes) -> bytes:
    """The unfinished UTF-8 character at the end of `data` (b"" when it ends on a whole one)."""
    for back in range(1, min(4, len(data)) + 1):
        c = data[-back]
        if c < 0x80:
            return b""
        if c >= 0xC0:  # a lead byte: its character has 2, 3 or 4 bytes
            size = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return data[-back:] if back < size else b""
    return b""


class Utf8Rules:
    """What xgrammar does not check of UTF-8, for one vocabulary (grammar_vocab's): the tokens each
    lead byte of SECOND_BYTE forbids next (those starting with a continuation byte outside its range),
    as xgrammar's bitmask rows [ceil(V / 32)] int32 with their bits cleared, to AND into a guide's row."""

    def __init__(self, vocab: list[bytes]):
        self.vocab = vocab
        first = np.array([b[0] if b else 0 for b in vocab])  # [V]
        continuation = (first >= 0x80) & (first <= 0xBF)
        self.allowed_after = {}
        for lead, (lo, hi) in SECOND_BYTE.items():
            forbidden = np.flatnonzero(continuation & ((first < lo) | (first > hi)))
            words = np.zeros(-(-len(vocab) // 32), dtype=np.uint32)  # bit j of word w: token 32 w + j
            np.bitwise_or.at(words, forbidden // 32, np.left_shift(np.uint32(1), (forbidden % 32).astype(np.uint32)))
            self.allowed_after[lead] = torch.from_numpy((~words).view(np.int32))


class Guide:
    """One sequence's grammar state. It only moves forward with the sequence's own tokens, so a
    preempted sequence keeps it as is: its recompute re-reads tokens the guide already took."""

    def __init__(self, matcher, vocab_size: int, utf8: Utf8Rules | None = None, ends: tuple[int, ...] = (),
                 call_separator: int | None = None):
        self._matcher = matcher
        self.vocab_size = vocab_size  # the tokenizer's: the width of its bitmask rows
        self.utf8 = utf8
        self._tail = b""  # the reply's unfinished UTF-8 character
        self.ends = ends  # the stop tokens the grammar ends on
        # several tool calls: where the grammar may end (a call is whole), this token may come instead and
        # the grammar starts over for the next call. A special token, so xgrammar never sees it.
        self.call_separator = call_separator

    def advance(self, token_id: int) -> bool:
        """Take the sampled token; True when it ended the grammar (a stop token after complete JSON)."""
        if token_id == self.call_separator:  # the mask allowed it only after a whole call
            self._matcher.reset()
            self._tail = b""
            return False
        if not self._matcher.accept_token(token_id):
            raise GuidedDecodingError(f"token {token_id} does not fit the grammar")
        if self.utf8 is not None and token_id < len(self.utf8.vocab):
            self._tail = utf8_tail(self._tail + self.utf8.vocab[token_id])
        return self._matcher.is_terminated()

    def utf8_allowed(self) -> torch.Tensor | None:
        """A bitmask row [ceil(V / 32)] int32 without the tokens the reply's lone lead byte rules out
        next, beyond the grammar's mask (None: nothing more is ruled out)."""
        if self.utf8 is None or len(self._tail) != 1:
            return None
        return self.utf8.allowed_after.get(self._tail[0])

    def allow_separator(self, row: torch.Tensor) -> None:
        """In place on its bitmask row [ceil(V / 32)] int32: the call separator too where a stop token is allowed."""
        if self.call_separator is None:
            return
        words = row.numpy().view(np.uint32)  # the same memory
        if any(words[t >> 5] >> np.uint32(t & 31) & np.uint32(1) for t in self.ends):
            words[self.call_separator >> 5] |= np.uint32(1) << np.uint32(self.call_separator & 31)


@dataclass
class _Cached:
    grammar: Any  # a CompiledGrammar
    size: int  # its memory_size_bytes, as counted in
    used: float  # its last use (time.monotonic)


class Grammars:
    """Compiles GuidedSpecs for one tokenizer and makes Guides. Cheap to create: xgrammar and the
    vocabulary are loaded on first use.

    The cache is bounded by the compiled grammars' memory, not their number (one of 10,000 choices
    takes ~90 MB, a small schema's a few hundred KB); the newest entry always stays, and so do those
    used in the last RECENT_S up to twice the budget: the API compiles a request's grammar before the
    engine adds the request, which must find it here, not compile it again on the engine's thread.
    The API compiles in threads of its own (`compile_async`): a compile may take minutes, and must
    hold neither the event loop, the engine loop, nor the threads that tokenize prompts."""

    COMPILE_THREADS = 2
    RECENT_S = 30.0

    def __init__(self, tokenizer, cache_bytes: int = 256 << 20):
        self.tokenizer = tokenizer
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._compiler = None
        self._utf8: Utf8Rules | None = None
        self._cache: OrderedDict[GuidedSpec, _Cached] = OrderedDict()  # least recently used first
        self._cached_bytes = 0
        self._pool: ThreadPoolExecutor | None = None

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tok = self.tokenizer
                vocab = grammar_vocab(tok)
                self._utf8 = Utf8Rules(vocab)
                info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                         stop_token_ids=list(tok.stop_token_ids))
                # our LRU is the cache; xgrammar's own would keep a second copy of each grammar
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_enabled=False)
            return self._compiler

    def compile(self, spec: GuidedSpec):
        """The CompiledGrammar of `spec`, from the cache when it is there. GuidedSpecError when the
        grammar engine cannot build it (an unsupported or contradictory schema)."""
        with self._lock:
            if spec in self._cache:
                return self._touch(spec)
        compiler = self._get_compiler()
        try:  # outside the lock: the engine loop never waits on an API thread's long compile
            compiled = compiler.compile_grammar(build_grammar(spec))
        except Exception as e:  # xgrammar raises RuntimeError (and others) with the reason
            what = "schema" if spec.kind in (JSON_SCHEMA, TOOL_CALL) else spec.kind
            raise GuidedSpecError(f"the grammar engine cannot compile this {what}: {_clean_message(e)}") from e
        _check_can_start(compiled, self.tokenizer.vocab_size, spec)
        with self._lock:
            if spec not in self._cache:  # another thread may have compiled it meanwhile
                self._cache[spec] = _Cached(compiled, compiled.memory_size_bytes, 0.0)
                self._cached_bytes += compiled.memory_size_bytes
            compiled = self._touch(spec)
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                oldest = next(iter(self._cache.values()))
                if time.monotonic() - oldest.used < self.RECENT_S and self._cached_bytes <= 2 * self.cache_bytes:
                    break  # the least recent was used moments ago: so were all the others
                self._cached_bytes -= self._cache.popitem(last=False)[1].size
            return compiled

    def _touch(self, spec: GuidedSpec):  # under _lock
        """The cached grammar of `spec`, now the most recently used."""
        self._cache.move_to_end(spec)
        entry = self._cache[spec]
        entry.used = time.monotonic()
        return entry.grammar

    async def compile_async(self, spec: GuidedSpec) -> None:
        """compile() for the event loop: nothing to wait for when the grammar is cached, else a
        compile in one of this object's own threads."""
        with self._lock:
            if spec in self._cache:
                self._touch(spec)
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.COMPILE_THREADS, thread_name_prefix="grammar-compile")
        await asyncio.get_running_loop().run_in_executor(self._pool, self.compile, spec)

    def guide(self, spec: GuidedSpec, stop_token_ids) -> Guide:
        """A fresh Guide; stop_token_ids: the request's effective stop ids. Its grammar ends on those
        of them that are special tokens (the model's when there are none). A stop id that is text
        stays an ordinary token to the grammar: one it writes stops the reply there (the engine's
        stop check). Kept out of the grammar, it could leave it no token to go on with."""
        import xgrammar as xgr

        ends = sorted(t for t in stop_token_ids if self.tokenizer.is_special(t)) or list(self.tokenizer.stop_token_ids)
        matcher = xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=ends)
        return Guide(matcher, self.tokenizer.vocab_size, self._utf8, tuple(ends), spec.call_separator)


def _check_can_start(compiled, vocab_size: int, spec: GuidedSpec) -> None:
    """GuidedSpecError when no token may open the reply (after GLM-4's newline, where the spec
    requires it): a grammar that only control characters satisfy (grammar_vocab hides them) or that
    has no sentence at all."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher = xgr.GrammarMatcher(compiled)
    if spec.requires_newline:
        matcher.accept_string("\n")
    matcher.fill_next_token_bitmask(bitmask, 0)
    if not bool((bitmask != 0).any()):
        raise GuidedSpecError(f"no reply can follow this {spec.kind}: it allows no first token (replies hold no "
                              "control character but the newline)")


def mask_logits(logits: torch.Tensor, guides: list[Guide]) -> None:
    """In place: -inf on every token that guides[i] forbids in row i (logits [len(guides), V])."""
    import xgrammar as xgr

    vocab_size = guides[0].vocab_size
    bitmask = xgr.allocate_token_bitmask(len(guides), vocab_size)  # [G, ceil(V/32)] int32, bit = allowed
    matchers = [g._matcher for g in guides]
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(bitmask, 0)
    else:  # in C++ threads: some states (long bounded strings) take milliseconds each
        xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 1).batch_fill_next_token_bitmask(matchers, bitmask)
    for i, guide in enumerate(guides):
        allowed = guide.utf8_allowed()
        if allowed is not None:
            bitmask[i] &= allowed
        guide.allow_separator(bitmask[i])
    # [G]: a grammar with no way on (it needs a control character or ill-formed UTF-8, a surrogate's, here)
    stuck = (bitmask == 0).all(dim=1)
    if bool(stuck.any()):
        raise GuidedDecodingError("the constraint allows no token here (replies hold no control character but "
                                  "the newline, and only well-formed UTF-8)")
    width = min(vocab_size, logits.shape[1])
    if logits.device.type == "cpu" and sys.byteorder == "little":
        # unpackbits + one masked_fill is ~5x faster than xgrammar's CPU kernel on a 151K vocabulary
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # [G, 32 * W], 0/1
        logits[:, :width].masked_fill_(~torch.from_numpy(bits).view(torch.bool)[:, :width], -torch.inf)
    else:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=width)
    if logits.shape[1] > vocab_size:  # ids past the tokenizer's (padding rows) are never grammatical
        logits[:, vocab_size:] = -torch.inf
