"""Tokenizer loading (tokenizer.json and tiktoken tokenizer.model) and the small test tokenizer."""

from __future__ import annotations

import base64
import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

from glm4serve.model.small_tokenizer import GLM4_SPECIAL_TOKENS, write_small_tokenizer
from glm4serve.model.tokenizer import Tokenizer, TokenizerError

from shared_models import GLM4_CHAT_DIR

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好！我是人工智能助手，今天天气很好。",
    "Emoji: 🎉👍🏽 👨‍👩‍👧 and flags 🇨🇳🇺🇸",
    'def f(x):\n    return {"a": [1, 2, 3], "b": None}  # comment\n\n\tprint(f(2))\r\n',
    '{"city": "北京", "unit": "celsius", "temperature": 23.5, "ok": true}',
    "Mixed 中英文 text with numbers 1234567 and    spaces   \n\n\n and 'quotes' it's I'LL",
    "",
    " ",
    "\n",
    "ａｂｃ full-width, Ünïcödé, русский текст, 한국어, العربية, हिन्दी",
]

# code point ranges for random text: ASCII, whitespace, Latin-1, Cyrillic, CJK, Hangul, emoji
_RANGES = [
    (0x20, 0x7E), (0x09, 0x0D), (0xA0, 0xFF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x200B, 0x200D), (0x3000, 0x303F), (0x10000, 0x10FFFF),
]


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(1, 60)):
            lo, hi = rng.choice(_RANGES)
            cp = rng.randint(lo, hi)
            chars.append(chr(cp))
        texts.append("".join(chars))
    return texts


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_tok")
    write_small_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tiktoken_dir(small_dir, tmp_path_factory) -> Path:
    # the same tokenizer without tokenizer.json, so from_dir must take the tiktoken path
    out = tmp_path_factory.mktemp("small_tok_tiktoken")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(small_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def tok_json(small_dir) -> Tokenizer:
    return Tokenizer.from_dir(small_dir)


@pytest.fixture(scope="module")
def tok_tiktoken(tiktoken_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiktoken_dir)


@pytest.fixture(scope="module", params=["json", "tiktoken"])
def tok(request, tok_json, tok_tiktoken) -> Tokenizer:
    return tok_json if request.param == "json" else tok_tiktoken


def read_ranks(path: Path) -> list[bytes]:
    lines = path.read_text().splitlines()
    ranks = [line.split() for line in lines]
    assert [int(r) for _, r in ranks] == list(range(len(ranks)))
    return [base64.b64decode(b) for b, _ in ranks]


# ---- the small tokenizer's files ----


def test_small_tokenizer_files_and_id_count(small_dir, tok_json, tok_tiktoken):
    ranks = read_ranks(small_dir / "tokenizer.model")
    assert len(ranks) == 256 + 2000
    assert sorted(ranks[:256]) == [bytes([b]) for b in range(256)]
    assert len(set(ranks)) == len(ranks)
    assert all(len(t) >= 2 for t in ranks[256:])
    assert tok_json.vocab_size == tok_tiktoken.vocab_size == len(ranks) + 14

    config = json.loads((small_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert "chat_template" not in config
    decoder = {int(i): e["content"] for i, e in config["added_tokens_decoder"].items()}
    assert decoder == {len(ranks) + k: t for k, t in enumerate(GLM4_SPECIAL_TOKENS)}

    spec = json.loads((small_dir / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in spec["added_tokens"] if t["special"]}
    assert added == decoder


def test_write_returns_id_count_and_is_deterministic(tmp_path):
    n = write_small_tokenizer(tmp_path / "a", num_merges=300, seed=3)
    assert n == 256 + 300 + 14
    write_small_tokenizer(tmp_path / "b", num_merges=300, seed=3)
    write_small_tokenizer(tmp_path / "c", num_merges=300, seed=4)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() != (tmp_path / "c" / "tokenizer.model").read_bytes()
    assert Tokenizer.from_dir(tmp_path / "a").vocab_size == n


def test_small_tokenizer_has_multibyte_tokens_and_splits_chinese(tok):
    for text in ["The weather is sunny today.", "今天天气很好，我们一起去公园。", '{"role": "user", "content": "hi"}']:
        ids = tok.encode(text)
        assert len(ids) < len(text.encode("utf-8")) / 1.5, text
    # some Chinese character must straddle a token boundary (what the detokenizer must handle)
    ids = tok.encode("".join(chr(c) for c in range(0x4E00, 0x4E00 + 3000, 7)))
    partial = [i for i in ids if not _is_valid_utf8(tok.token_bytes(i))]
    assert len(partial) > 10


def _is_valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---- behaviour shared by both loaders ----


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


def test_round_trip_random_utf8(tok):
    for text in random_texts(seed=0, count=200):
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_encode_to_their_ids(tok, small_dir):
    config = json.loads((small_dir / "tokenizer_config.json").read_text())
    from_file = {e["content"]: int(i) for i, e in config["added_tokens_decoder"].items()}
    assert tok.special_tokens == from_file
    for text, i in from_file.items():
        assert tok.encode(text) == [i]
        assert tok.is_special(i)
        assert tok.token_bytes(i) == text.encode()
    prompt = "[gMASK]<sop><|user|>\nhi<|assistant|>"
    ids = tok.encode(prompt)
    s = tok.special_tokens
    assert ids[:3] == [s["[gMASK]"], s["<sop>"], s["<|user|>"]] and ids[-1] == s["<|assistant|>"]
    assert sum(tok.is_special(i) for i in ids) == 4
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "\nhi"


def test_no_special_tokens_added_implicitly(tok):
    ids = tok.encode("hi")
    assert ids and not any(tok.is_special(i) for i in ids)
    assert tok.encode("") == []


def test_allow_special_false_encodes_special_text_as_plain_text(tok):
    text = "say <|user|> and [gMASK] please"
    plain = tok.encode(text, allow_special=False)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text
    assert tok.special_tokens["<|user|>"] in tok.encode(text)


ENCODE_S = 0.8  # seconds of one long encode: far more than a tick of the loop below


def _seconds(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


@pytest.mark.parametrize("allow_special", [True, False])
def test_long_encode_lets_other_threads_run(tok, allow_special):
    """The server tokenizes long prompts in a worker thread; an encode that held the GIL
    throughout would stall the event loop (every other request, /health) until it finished."""
    text = "hello world, " * 100_000  # 1.3 MB, doubled until one encode takes ENCODE_S on this machine
    while _seconds(lambda: tok.encode(text, allow_special=allow_special)) < ENCODE_S:
        text *= 2
    ticks, done = [], threading.Event()
    worker = threading.Thread(target=lambda: (tok.encode(text, allow_special=allow_special), done.set()))
    start = time.monotonic()
    worker.start()
    while not done.is_set():
        time.sleep(0.005)
        ticks.append(time.monotonic())
    worker.join()
    took, gaps = time.monotonic() - start, [b - a for a, b in zip(ticks, ticks[1:])]
    # holding the GIL throughout, the encode would show as one gap of about its whole time
    assert len(ticks) > 20 and max(gaps) < took / 2, (len(ticks), max(gaps, default=None), took)


def test_stop_eos_pad_without_generation_config(tok):
    s = tok.special_tokens
    assert tok.stop_token_ids == [s["<|endoftext|>"], s["<|user|>"], s["<|observation|>"]]
    assert tok.eos_token_id == tok.pad_token_id == s["<|endoftext|>"]
    assert tok.chat_template is None


def test_token_bytes_consistent_with_decode(tok):
    for text in TEXTS + random_texts(seed=1, count=50):
        ids = tok.encode(text, allow_special=False)
        joined = b"".join(tok.token_bytes(i) for i in ids)
        assert joined == text.encode("utf-8")
        # any slice of ids (e.g. a half-streamed reply) decodes like its joined bytes
        cut = ids[: len(ids) // 2 + 1]
        assert tok.decode(cut) == b"".join(tok.token_bytes(i) for i in cut).decode("utf-8", errors="replace")
    every = list(range(tok.vocab_size))
    normal = [i for i in every if not tok.is_special(i)]
    assert tok.decode(normal) == b"".join(tok.token_bytes(i) for i in normal).decode("utf-8", errors="replace")


def test_out_of_range_ids_raise(tok):
    for bad in (tok.vocab_size, -1, 10**9):
        with pytest.raises(TokenizerError, match=str(bad)):
            tok.token_bytes(bad)
        with pytest.raises(TokenizerError):
            tok.decode([0, bad])


# ---- the two formats agree with each other and with transformers ----


def test_tiktoken_and_tokenizer_json_give_identical_ids(tok_json, tok_tiktoken):
    assert tok_json.special_tokens == tok_tiktoken.special_tokens
    for i in range(tok_json.vocab_size):
        assert tok_json.token_bytes(i) == tok_tiktoken.token_bytes(i), i
    texts = TEXTS + random_texts(seed=2, count=300) + ["<|user|>x<|assistant|>[gMASK]<eop>"]
    texts.append(Path(__file__).read_text(encoding="utf-8"))
    for text in texts:
        assert tok_json.encode(text) == tok_tiktoken.encode(text), text
        assert tok_json.encode(text, allow_special=False) == tok_tiktoken.encode(text, allow_special=False)


def test_transformers_loads_small_tokenizer_with_identical_ids(small_dir, tok_json):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(small_dir))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(small_dir / "tokenizer.json"))
    assert len(auto) == tok_json.vocab_size
    assert auto.convert_tokens_to_ids("<|observation|>") == tok_json.special_tokens["<|observation|>"]
    assert auto.eos_token_id == tok_json.eos_token_id
    for text in TEXTS + random_texts(seed=3, count=50) + ["[gMASK]<sop><|user|>\nhi<|assistant|>"]:
        ours = tok_json.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ours
        assert auto(text)["input_ids"] == ours  # its post-processor adds nothing either
        assert fast.encode(text, add_special_tokens=False) == ours
        assert auto.decode(ours) == tok_json.decode(ours)


# ---- loading rules ----


def test_missing_files_raise_naming_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=str(tmp_path)) as info:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(info.value, ValueError)


def test_tiktoken_special_ids_are_read_from_config(tiktoken_dir, tmp_path):
    # shift every special id by 50: the loader must follow the file, not assume "after the ranks"
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiktoken_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(i) + 50): e for i, e in config["added_tokens_decoder"].items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shifted = Tokenizer.from_dir(tmp_path)
    original = Tokenizer.from_dir(tiktoken_dir)
    for text, i in original.special_tokens.items():
        assert shifted.special_tokens[text] == i + 50
        assert shifted.encode(text) == [i + 50]
    assert shifted.vocab_size == original.vocab_size + 50
    assert shifted.stop_token_ids == [i + 50 for i in original.stop_token_ids]


def test_stop_ids_chat_template_from_files(small_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(small_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7, "pad_token_id": 3}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2, 5]}))
    assert Tokenizer.from_dir(tmp_path).stop_token_ids == [1, 2, 5]

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert tok.pad_token_id == 3  # no pad_token in tokenizer_config: config.json's
    (tmp_path / "chat_template.jinja").write_text("from the jinja file")
    assert Tokenizer.from_dir(tmp_path).chat_template == "from the jinja file"


def test_tokenizer_json_preferred_over_tokenizer_model(small_dir, tmp_path):
    shutil.copy(small_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_text("not a tiktoken file\n")
    tok = Tokenizer.from_dir(tmp_path)  # no tokenizer_config.json: specials come from tokenizer.json
    assert tok.encode("<|user|>") == [tok.special_tokens["<|user|>"]]
    assert len(tok.special_tokens) == 14


def test_malformed_tiktoken_file_raises(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(TokenizerError, match="tokenizer.model:2"):
        Tokenizer.from_dir(tmp_path)


# ---- the real glm-4-9b-chat tokenizer.model ----


@pytest.fixture(scope="module")
def glm4() -> Tokenizer:
    if not (GLM4_CHAT_DIR / "tokenizer.model").is_file():
        pytest.skip(f"{GLM4_CHAT_DIR} is absent")
    return Tokenizer.from_dir(GLM4_CHAT_DIR)


def test_glm4_check_value_and_stop_ids(glm4):
    assert glm4.encode("[gMASK]<sop><|user|>\nhi<|assistant|>") == [151331, 151333, 151336, 198, 6023, 151337]
    assert glm4.stop_token_ids == [151329, 151336, 151338]
    assert glm4.eos_token_id == glm4.pad_token_id == 151329
    assert glm4.vocab_size == 151343
    assert len(glm4.special_tokens) == 14 and min(glm4.special_tokens.values()) == 151329
    assert glm4.chat_template and "[gMASK]<sop>" in glm4.chat_template
    assert glm4.encode("\n") == [198]


def test_glm4_round_trip_and_token_bytes(glm4):
    text = (
        "你好，GLM-4！请帮我写一个函数：\n```python\ndef add(a, b):\n    return a + b  # 加法\n```\n"
        '{"city": "北京", "temp": 23.5} 🎉 龘靐齉 Ünïcödé\r\n\tdone.'
    )
    for t in [text, *TEXTS, *random_texts(seed=4, count=100)]:
        ids = glm4.encode(t)
        assert glm4.decode(ids) == t
        assert b"".join(glm4.token_bytes(i) for i in ids) == t.encode("utf-8")
    plain = glm4.encode("<|user|>", allow_special=False)
    assert 151336 not in plain and glm4.decode(plain) == "<|user|>"
    assert glm4.decode([151331, 151333, 6023], skip_special_tokens=True) == "hi"
