"""A checkpoint's tokenizer, loaded without remote code and without transformers.

Two on-disk formats are read:
  - `tokenizer.json` (HF fast tokenizer, byte-level BPE): run by the `tokenizers` package;
  - `tokenizer.model` (THUDM's tiktoken file, one `base64(token_bytes) rank` per line): run by
    `tiktoken` with GLM-4's split pattern; the special tokens come from tokenizer_config.json.

Both give the same small surface: encode, decode, and `token_bytes(id)`, which the incremental
detokenizer calls once per generated token (so it is a precomputed list lookup).
Nothing is ever added implicitly: the rendered GLM-4 prompt already starts with `[gMASK]<sop>`.
"""

from __future__ import annotations

import base64
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

# GLM-4's pre-tokenizer split pattern (the same as THUDM's ChatGLM4Tokenizer and cl100k).
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Stop tokens to fall back on when neither generation_config.json nor config.json names any.
GLM4_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
GLM4_PREFIX_TOKENS = ("[gMASK]", "<sop>")  # ChatGLM4Tokenizer puts these in front of every input


class TokenizerError(ValueError):
    """The tokenizer files are missing or unusable, or an id is outside the vocabulary."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json spells a token either as a string or as {"content": ...}
    if isinstance(value, dict):
        return value.get("content")
    return value


class _TiktokenBackend:
    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)


class _HFBackend:
    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._json_text = json_text
        self.tokenizer = HFTokenizer.from_str(json_text)

    @cached_property
    def plain(self):
        # A second instance that encodes special-token text as ordinary text; kept separate
        # instead of toggling `encode_special_tokens` so concurrent encodes never race.
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self._json_text)
        tok.encode_special_tokens = True
        return tok

    def encode(self, text: str, allow_special: bool) -> list[int]:
        tok = self.tokenizer if allow_special else self.plain
        # add_special_tokens=False: a post-processor must never prepend/append tokens.
        # a batch call, not encode: only those release the GIL, so a long prompt tokenized in a
        # worker thread does not stall the event loop (and every other request) meanwhile; the fast
        # one keeps no character offsets (5M characters: 2.4 s and +644 MB, against 4.4 s and +857 MB)
        return tok.encode_batch_fast([text], add_special_tokens=False)[0].ids


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_sampling_defaults(directory: str | Path) -> dict:
    """generation_config.json's sampling settings (glm-4-9b-chat: temperature 0.8, top_p 0.8): the defaults of
    requests that leave them out, as vLLM takes them; {} without the file."""
    gen_config = _read_json(Path(directory) / "generation_config.json")
    return {k: gen_config[k] for k in SAMPLING_DEFAULT_KEYS if k in gen_config}


class Tokenizer:
    """Encode/decode for one checkpoint. Build it with `Tokenizer.from_dir(path)`."""

    def __init__(
        self,
        backend: _TiktokenBackend | _HFBackend,
        token_bytes: list[bytes],
        special_tokens: dict[str, int],
        stop_token_ids: list[int],
        eos_token_id: int | None,
        pad_token_id: int | None,
        chat_template: str | None,
        source: str,
        sampling_defaults: dict | None = None,
    ):
        self._backend = backend
        self._token_bytes = token_bytes
        self.vocab_size = len(token_bytes)
        self.special_tokens = special_tokens
        self._special_ids = frozenset(special_tokens.values())
        self.stop_token_ids = stop_token_ids
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.source = source  # the file it was loaded from, for messages
        # generation_config.json's sampling settings (glm-4-9b-chat: temperature 0.8, top_p 0.8),
        # used by the API for requests that leave them out, as vLLM does
        self.sampling_defaults = sampling_defaults or {}

    # ---- loading ----

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a checkpoint folder, or the one a GGUF file holds."""
        from .gguf_file import is_gguf

        if is_gguf(path):
            return cls.from_gguf(path)
        directory = Path(path)
        tok_config = _read_json(directory / "tokenizer_config.json")
        if (directory / "tokenizer.json").is_file():
            backend, token_bytes, special_tokens = _load_tokenizer_json(directory / "tokenizer.json")
        elif (directory / "tokenizer.model").is_file():
            backend, token_bytes, special_tokens = _load_tiktoken(directory / "tokenizer.model", tok_config)
        else:
            raise TokenizerError(
                f"no tokenizer in {directory}: expected tokenizer.json or tokenizer.model"
            )

        gen_config = _read_json(directory / "generation_config.json")
        model_config = _read_json(directory / "config.json")
        stop_ids = _as_id_list(gen_config.get("eos_token_id")) or _as_id_list(
            model_config.get("eos_token_id")
        )
        if not stop_ids:
            stop_ids = [special_tokens[t] for t in GLM4_STOP_TOKENS if t in special_tokens]

        def config_token_id(key: str) -> int | None:
            text = _token_text(tok_config.get(key))
            return special_tokens.get(text) if text is not None else None

        eos_id = config_token_id("eos_token")
        if eos_id is None:
            eos_id = stop_ids[0] if stop_ids else None
        pad_id = config_token_id("pad_token")
        if pad_id is None:
            pad_ids = _as_id_list(gen_config.get("pad_token_id")) or _as_id_list(
                model_config.get("pad_token_id")
            )
            pad_id = pad_ids[0] if pad_ids else None

        return cls(
            backend=backend,
            token_bytes=token_bytes,
            special_tokens=special_tokens,
            stop_token_ids=stop_ids,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            chat_template=_load_chat_template(directory, tok_config),
            source=str(directory),
            sampling_defaults=read_sampling_defaults(directory),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """GLM-4's stop tokens by name (a GGUF file names one eos), no sampling defaults (it has no
        generation_config.json)."""
        from .gguf_file import gguf_tokenizer, open_gguf

        ranks, added, chat_template = gguf_tokenizer(open_gguf(path))
        backend, token_bytes, special_tokens = tiktoken_tokenizer(ranks, added, str(path))
        stop_ids = [special_tokens[t] for t in GLM4_STOP_TOKENS if t in special_tokens]
        pad = special_tokens.get(GLM4_STOP_TOKENS[0])  # glm-4-9b-chat's pad is its <|endoftext|>
        return cls(backend=backend, token_bytes=token_bytes, special_tokens=special_tokens, stop_token_ids=stop_ids,
                   eos_token_id=stop_ids[0] if stop_ids else None, pad_token_id=pad, chat_template=chat_template,
                   source=str(path))

    # ---- encode / decode ----

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`, adding nothing. With allow_special=False, special-token strings
        in `text` (e.g. a user typing "<|user|>") are encoded as ordinary text."""
        return self._backend.encode(text, allow_special)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token gives its text as UTF-8)."""
        if 0 <= token_id < self.vocab_size:
            return self._token_bytes[token_id]
        raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            special = self._special_ids
            ids = [i for i in ids if i not in special]
        return b"".join([self.token_bytes(i) for i in ids]).decode("utf-8", errors="replace")

    def with_prefix(self, ids: list[int]) -> list[int]:
        """ids with GLM-4's `[gMASK]<sop>` in front, as ChatGLM4Tokenizer encodes a raw prompt,
        unless they start with it already (or this tokenizer has no such tokens)."""
        if not all(t in self.special_tokens for t in GLM4_PREFIX_TOKENS):
            return ids
        prefix = [self.special_tokens[t] for t in GLM4_PREFIX_TOKENS]
        return ids if ids[: len(prefix)] == prefix else prefix + ids

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"specials={len(self.special_tokens)}, stop_token_ids={self.stop_token_ids})"
        )


# ---- format readers ----


def _load_tiktoken(path: Path, tok_config: dict[str, Any]):
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as e:
            raise TokenizerError(f"{path}:{line_no}: expected 'base64(token) rank', got {line[:80]!r}") from e

    # Specials live only in tokenizer_config.json for THUDM checkpoints; ids follow the ranks
    # there, but other checkpoints differ, so they are read, never computed.
    added = {
        int(i): (entry["content"], entry.get("special", True))
        for i, entry in tok_config.get("added_tokens_decoder", {}).items()
    }
    return tiktoken_tokenizer(ranks, added, str(path))


def tiktoken_tokenizer(ranks: dict[bytes, int], added: dict[int, tuple[str, bool]], source: str):
    """GLM-4's tokenizer over BPE ranks (a token's id is its rank) and added tokens {id: (text, special)}:
    (backend, token_bytes, special_tokens)."""
    import tiktoken

    rank_ids = set(ranks.values())
    clashes = sorted(i for i in added if i in rank_ids)
    if clashes:
        raise TokenizerError(f"{source}: added token ids {clashes[:5]} are also BPE ranks")

    encoding = tiktoken.Encoding(
        name=f"glm4serve:{source}",
        pat_str=GLM4_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={content: i for i, (content, _) in added.items()},
    )
    size = max([*ranks.values(), *added.keys()]) + 1
    token_bytes = [b""] * size  # ids in no file stay empty rather than failing a decode
    for b, rank in ranks.items():
        token_bytes[rank] = b
    for i, (content, _) in added.items():
        token_bytes[i] = content.encode("utf-8")
    special_tokens = {content: i for i, (content, special) in sorted(added.items()) if special}
    return _TiktokenBackend(encoding), token_bytes, special_tokens


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def has_byte_level(component: dict[str, Any] | None) -> bool:
        if not component:
            return False
        if component.get("type") == "ByteLevel":
            return True
        parts = component.get("pretokenizers") or component.get("decoders") or []
        return any(has_byte_level(p) for p in parts)

    return has_byte_level(spec.get("decoder")) or has_byte_level(spec.get("pre_tokenizer"))


def _load_tokenizer_json(path: Path):
    json_text = path.read_text(encoding="utf-8")
    spec = json.loads(json_text)
    if not _is_byte_level(spec):
        # token_bytes needs the byte-level vocabulary convention; GLM checkpoints all use it
        raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json files are supported")
    backend = _HFBackend(json_text)

    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    vocab: dict[str, int] = backend.tokenizer.get_vocab(with_added_tokens=False)
    added = spec.get("added_tokens", [])
    size = max([*vocab.values(), *(t["id"] for t in added)], default=-1) + 1
    token_bytes = [b""] * size
    for token, i in vocab.items():
        try:
            token_bytes[i] = bytes(byte_of_char[c] for c in token)
        except KeyError as e:
            raise TokenizerError(f"{path}: vocab entry {token!r} is not byte-level") from e
    for t in added:  # added tokens are stored as plain text, not byte-mapped
        token_bytes[t["id"]] = t["content"].encode("utf-8")
    special_tokens = {t["content"]: t["id"] for t in sorted(added, key=lambda t: t["id"]) if t.get("special")}
    return backend, token_bytes, special_tokens


def _load_chat_template(directory: Path, tok_config: dict[str, Any]) -> str | None:
    # transformers saves templates to chat_template.jinja nowadays and prefers it when present
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or (template[0].get("template") if template else None)
    return template
