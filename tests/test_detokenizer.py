import random
from pathlib import Path

import pytest

from glm4serve.engine.detokenizer import IncrementalDetokenizer
from glm4serve.engine.types import SamplingParams

from shared_models import GLM4_CHAT_DIR as MODEL_DIR


class FakeTokenizer:
    """Token ids -> raw bytes; ids in `special` are special tokens (their text as UTF-8)."""

    def __init__(self, pieces: dict[int, bytes], special: set[int] = frozenset()):
        self.pieces = pieces
        self.special = set(special)

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special


def tokenizer_for(*pieces: bytes | str, special: dict[int, str] | None = None) -> tuple[FakeTokenizer, list[int]]:
    """A tokenizer whose ids 0..n-1 are `pieces` in order (str pieces as UTF-8), plus specials."""
    table = {i: p.encode() if isinstance(p, str) else p for i, p in enumerate(pieces)}
    for token_id, text in (special or {}).items():
        table[token_id] = text.encode()
    return FakeTokenizer(table, set(special or ())), list(range(len(pieces)))


def stream(tokenizer, ids, **params) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    """Deltas of add() for each id (stopping at a stop string) and the stop matched."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params))
    deltas = []
    for token_id in ids:
        delta, stop = detok.add(token_id)
        deltas.append(delta)
        if stop is not None:
            return deltas, stop, detok
    return deltas, None, detok


def split_bytes(data: bytes, rng: random.Random, max_len: int = 4) -> list[bytes]:
    pieces, at = [], 0
    while at < len(data):
        n = rng.randint(1, max_len)
        pieces.append(data[at : at + n])
        at += n
    return pieces


# --- UTF-8 ---------------------------------------------------------------------------------------


def test_chinese_split_across_tokens_waits_for_whole_characters():
    data = "你好".encode()  # e4 bd a0 | e5 a5 bd
    tok, ids = tokenizer_for(data[:1], data[1:4], data[4:])
    deltas, _, detok = stream(tok, ids)
    assert deltas == ["", "你", "好"]
    assert detok.flush() == ""


def test_emoji_byte_by_byte():
    data = "a😀b".encode()
    tok, ids = tokenizer_for(*[data[i : i + 1] for i in range(len(data))])
    deltas, _, _ = stream(tok, ids)
    assert deltas == ["a", "", "", "", "😀", "b"]


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_reassemble_without_replacement_chars(seed):
    text = "GLM-4 说：你好，世界！🙂👍🏽 Grüße, naïve café — ok\n数学 ∑ x²"
    rng = random.Random(seed)
    tok, ids = tokenizer_for(*split_bytes(text.encode(), rng))
    deltas, stop, detok = stream(tok, ids)
    assert stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_invalid_bytes_become_replacement_once_certain():
    tok, ids = tokenizer_for(b"\xff", b"x", b"\xe4\xbd", b"A", b"\xe4")
    deltas, _, detok = stream(tok, ids)
    assert deltas == ["\ufffd", "x", "", "\ufffdA", ""]  # e4 bd could still complete, until "A"
    assert detok.flush() == "\ufffd"  # a character left unfinished at the end


# --- special tokens -------------------------------------------------------------------------------


def test_skip_special_tokens():
    tok, _ = tokenizer_for("hi", " there", special={100: "<|user|>"})
    ids = [0, 100, 1]
    assert stream(tok, ids)[0] == ["hi", "", " there"]
    assert stream(tok, ids, skip_special_tokens=False)[0] == ["hi", "<|user|>", " there"]


def test_skipped_special_token_does_not_break_a_split_character():
    data = "好".encode()
    tok, _ = tokenizer_for(data[:2], data[2:], special={9: "<|assistant|>"})
    assert stream(tok, [0, 9, 1])[0] == ["", "", "好"]


def test_special_token_text_overrides_skipping_and_the_tokens_own_text():
    tok, _ = tokenizer_for("hi", "<|assistant|>", special={9: "<|assistant|>", 10: "<|user|>"})
    marked = {9: "\udfff"}
    ids = [0, 9, 1, 10]  # token 1 is the text "<|assistant|>" in ordinary bytes
    assert stream(tok, ids, special_token_text=marked)[0] == ["hi", "\udfff", "<|assistant|>", ""]
    assert stream(tok, ids, special_token_text=marked, skip_special_tokens=False)[0] == [
        "hi", "\udfff", "<|assistant|>", "<|user|>"]
    # before it, the start of a character that can no longer complete: U+FFFD, as before its own text
    data = "好".encode()
    tok, _ = tokenizer_for(data[:2], data[2:], special={9: "<|assistant|>"})
    assert stream(tok, [0, 9, 1], special_token_text=marked)[0] == ["", "\ufffd\udfff", "\ufffd"]
    assert stream(tok, [0, 9, 1], skip_special_tokens=False)[0] == ["", "\ufffd<|assistant|>", "\ufffd"]


# --- stop strings ---------------------------------------------------------------------------------


def test_stop_string_across_token_boundaries():
    tok, ids = tokenizer_for("Hello <", "/en", "d> tail", "more")
    deltas, stop, detok = stream(tok, ids, stop=["</end>"])
    assert (deltas, stop) == (["Hello ", "", ""], "</end>")
    assert detok.flush() == ""
    assert detok.add(3) == ("", None)  # nothing after a stop


def test_include_stop_str_in_output():
    tok, ids = tokenizer_for("Hello <", "/en", "d> tail")
    deltas, stop, _ = stream(tok, ids, stop=["</end>"], include_stop_str_in_output=True)
    assert (deltas, stop) == (["Hello ", "", "</end>"], "</end>")


def test_partial_match_that_fails_is_released():
    tok, ids = tokenizer_for("a </e", "x b", " c")
    deltas, stop, _ = stream(tok, ids, stop=["</end>"])
    assert (deltas, stop) == (["a ", "</ex b", " c"], None)


def test_stop_strings_sharing_a_prefix():
    tok, ids = tokenizer_for("xab", "d", "c")
    deltas, stop, _ = stream(tok, ids, stop=["abc", "abd"])
    assert (deltas, stop) == (["x", ""], "abd")


def test_failed_longer_stop_can_still_contain_a_shorter_one():
    # "<|end" is held for "<|endoftext|>"; the next token breaks that match but completes "|>",
    # so the held text up to the "|>" is released and the shorter stop is still found
    tok, ids = tokenizer_for("ok<|end", "x|> done")
    deltas, stop, _ = stream(tok, ids, stop=["<|endoftext|>", "|>"])
    assert (deltas, stop) == (["ok", "<|endx"], "|>")


def test_first_completed_stop_wins_within_one_token():
    # both stops are in one token's text; "bc" ends first, as it would have streamed char by char
    tok, ids = tokenizer_for("abcd")
    assert stream(tok, ids, stop=["abcd", "bc"])[:2] == (["a"], "bc")


@pytest.mark.parametrize("seed", range(20))
def test_stop_handling_does_not_depend_on_token_boundaries(seed):
    text = "Answer: 42 <|obs 你好 <|observation|> tail END"
    stops = ["<|observation|>", "<|obs>", "END", "好 <x"]
    expected_text, expected_stop = "Answer: 42 <|obs 你好 ", "<|observation|>"
    rng = random.Random(seed)
    tok, ids = tokenizer_for(*split_bytes(text.encode(), rng, max_len=6))
    for include in (False, True):
        deltas, stop, _ = stream(tok, ids, stop=stops, include_stop_str_in_output=include)
        assert stop == expected_stop
        assert "".join(deltas) == expected_text + (expected_stop if include else "")


@pytest.mark.parametrize("seed", range(10))
def test_no_prefix_of_a_stop_string_leaks_before_it_is_decided(seed):
    # every emitted prefix of the text must be one that no stop string could extend into a match
    text = "The end is near; the endgame: <stop> never"
    stops = ["<stop>", "the end."]
    rng = random.Random(seed)
    tok, ids = tokenizer_for(*split_bytes(text.encode(), rng, max_len=3))
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=stops))
    emitted = ""
    for token_id in ids:
        delta, stop = detok.add(token_id)
        emitted += delta
        if stop:
            break
        for s in stops:  # no emitted suffix is a proper prefix of a stop
            assert not any(emitted.endswith(s[:n]) for n in range(1, len(s)))
    assert (emitted, stop) == ("The end is near; the endgame: ", "<stop>")


@pytest.mark.parametrize("seed", range(20))
def test_held_back_text_is_exactly_the_longest_suffix_that_could_start_a_stop(seed):
    # a two-letter alphabet: stops overlap the text (and each other) in many places
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(2, 7))) for _ in range(3)]
    text = "".join(rng.choice("ab") for _ in range(40))
    tok, ids = tokenizer_for(*split_bytes(text.encode(), rng, max_len=3))
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=stops))
    emitted, seen = "", ""
    for token_id in ids:
        seen += tok.token_bytes(token_id).decode()
        delta, stop = detok.add(token_id)
        emitted += delta
        if stop:
            return
        hold = max((n for s in stops for n in range(1, len(s)) if seen.endswith(s[:n])), default=0)
        assert emitted == seen[: len(seen) - hold], (stops, seen)


def test_a_long_stop_string_is_held_back_and_matched():
    # a stop string's prefixes are checked in place: never all of them built (quadratic in its length)
    rng = random.Random(0)
    stop = "".join(rng.choice("xyz") for _ in range(60_000))
    chunks = [stop[i : i + 1000] for i in range(0, len(stop), 1000)]
    tok, ids = tokenizer_for("a", *chunks[:-1], "q", chunks[-1])
    deltas, matched, _ = stream(tok, ids[:-2] + [ids[-1]], stop=[stop])
    assert (deltas[0], set(deltas[1:-1]), deltas[-1], matched) == ("a", {""}, "", stop)
    deltas, matched, detok = stream(tok, ids, stop=[stop])  # "q" breaks the match: all of it released
    assert (deltas[-2], deltas[-1] + detok.flush(), matched) == (stop[:-1000] + "q", chunks[-1], None)


def test_flush_returns_held_back_text():
    tok, ids = tokenizer_for("hi #", "#")
    deltas, stop, detok = stream(tok, ids, stop=["###"])
    assert (deltas, stop) == (["hi ", ""], None)
    assert detok.flush() == "##"
    assert detok.flush() == ""


def test_empty_stop_string_is_ignored():
    tok, ids = tokenizer_for("a", "b")
    assert stream(tok, ids, stop=[""])[:2] == (["a", "b"], None)


def test_a_stop_string_begun_before_min_tokens_and_ended_after_is_matched():
    """As vLLM's: the text before min_tokens keeps its tail back; a stop ending after is found there."""
    tok, ids = tokenizer_for("Hello", " world", ", more")
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["o w"]))
    assert detok.add(ids[0], check_stops=False) == ("Hell", None)
    assert detok.add(ids[1]) == ("", "o w")


def test_a_stop_string_ended_before_min_tokens_stays_unmatched_in_the_held_tail():
    tok, ids = tokenizer_for("xab", "d", "ab")  # "ab" is whole before min_tokens, held as the start of "xabc"
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["ab", "xabc"]))
    assert detok.add(ids[0], check_stops=False) == ("", None)
    assert detok.add(ids[1]) == ("xabd", None)
    assert detok.add(ids[2]) == ("", "ab")


# --- with the real GLM-4 vocabulary ---------------------------------------------------------------


class TiktokenFile:
    """The real glm-4-9b-chat token bytes, read straight from tokenizer.model (no special tokens)."""

    def __init__(self, path: Path):
        import tiktoken.load

        self.ranks = tiktoken.load.load_tiktoken_bpe(str(path))
        self.by_id = {rank: piece for piece, rank in self.ranks.items()}

    def token_bytes(self, token_id: int) -> bytes:
        return self.by_id[token_id]

    def is_special(self, token_id: int) -> bool:
        return False


def test_real_glm4_tokens_of_chinese_and_emoji():
    path = MODEL_DIR / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"{path} not present")
    import tiktoken

    vocab = TiktokenFile(path)
    encoding = tiktoken.Encoding(
        "glm4-test",
        pat_str=(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),  # GLM4.md section 4
        mergeable_ranks=vocab.ranks,
        special_tokens={},
    )
    text = "今天天气很好，我们去爬山吧！🧗‍♀️🏔️ 饕餮 龘 𠮷野家"
    ids = encoding.encode(text)
    # the test means something only if some token ends inside a character
    assert any(_is_partial(vocab.token_bytes(i)) for i in ids)
    deltas, stop, detok = stream(vocab, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def _is_partial(piece: bytes) -> bool:
    try:
        piece.decode()
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("pieces", [("\n", "one\ntwo"), ("\none", "\ntwo"), ("\none\nt", "wo")])
def test_a_chat_replys_opening_newline_is_passed_on_but_matches_no_stop_string(pieces):
    tok, ids = tokenizer_for(*pieces)
    deltas, stop, _ = stream(tok, ids, stop=["\n"], stops_skip_leading_newline=True)
    assert ("".join(deltas), stop) == ("\none", "\n")
    # without the flag (completions) the newline is text like any other
    deltas, stop, _ = stream(tok, ids, stop=["\n"])
    assert ("".join(deltas), stop) == ("", "\n")
    # only the first newline, and only when the reply opens with one
    tok, ids = tokenizer_for("a\n", "b")
    assert stream(tok, ids, stop=["\n"], stops_skip_leading_newline=True)[:2] == (["a"], "\n")
