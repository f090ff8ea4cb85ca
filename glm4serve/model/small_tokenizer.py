"""A small, deterministic GLM-4-style tokenizer written in the real on-disk formats.

Tests and the tiny random-weight models need a tokenizer that behaves like GLM-4's (byte-level
BPE, GLM-4's split regex, the 14 special tokens right after the last rank, multi-byte Chinese
characters that sometimes straddle tokens) without shipping a 2.6 MB vocabulary. This trains a
few thousand BPE merges on a built-in corpus and writes:

  - tokenizer.model      tiktoken file: `base64(bytes) rank`, the 256 single bytes then the merges;
  - tokenizer.json       the same vocabulary as an HF fast tokenizer (loadable by transformers);
  - tokenizer_config.json  added_tokens_decoder, eos/pad, tokenizer_class (no chat template).

tiktoken merges adjacent tokens whose *concatenation* has the lowest rank, so tokenizer.json lists
every split of each token into two vocabulary tokens (as transformers' TikTokenConverter does)
and sets ignore_merges; both files then give identical ids.
"""

from __future__ import annotations

import base64
import heapq
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from glm4serve.model.tokenizer import GLM4_SPLIT_PATTERN, bytes_to_unicode

GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

_CORPUS = r'''
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the
tokens before it. When the server streams a reply, each chunk carries the text of the new tokens.
You are a helpful assistant. Answer the question as briefly as you can, and say so when you do not
know the answer. What is the weather like in Paris today? It is sunny and warm, about 25 degrees.
Please write a short poem about the sea. The sea is wide, the sea is deep, it sings the sailors
into sleep. Thank you! You're welcome; I'm glad it helped. Let's think step by step: first we read
the input, then we compute the result, and finally we check that the result is correct.
The model has forty layers, a hidden size of 4096 and a vocabulary of about one hundred fifty
thousand tokens. Requests are batched together so that the accelerator stays busy.

你好！我是人工智能助手，很高兴为你服务。请问有什么可以帮助你的吗？
今天天气很好，我们一起去公园散步吧。北京是中国的首都，上海是一个国际化的大城市。
这个模型可以回答问题、写文章、翻译语言，还可以调用工具来获取实时信息。
在调用上述函数时，请使用 Json 格式表示调用的参数。
你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。
我们的服务器支持流式输出，每一个新的词元都会立刻发送给客户端。中文字符在 UTF-8 编码中占用三个字节。
学习编程需要耐心和练习。首先要理解基本的概念，然后通过写代码来巩固知识。

def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Request:
    def __init__(self, request_id: str, prompt_ids: list[int], max_tokens: int = 16):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens

    def is_finished(self) -> bool:
        return len(self.output_ids) >= self.max_tokens


import json
from pathlib import Path

if __name__ == "__main__":
    for i in range(10):
        print(f"step {i}: loss = {1.0 / (i + 1):.4f}")

function add(a, b) {
    return a + b;
}
const result = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(data) });

{"model": "glm-4-9b-chat", "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}], "temperature": 0.8, "top_p": 0.8, "stream": true}
{"id": "chatcmpl-123", "object": "chat.completion", "created": 1700000000, "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}
{"name": "get_weather", "description": "Get the current weather in a given city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name, e.g. Beijing"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}
{"city": "北京", "unit": "celsius", "temperature": 23, "humidity": 0.45, "ok": true, "tags": null}
Machine learning is a field of study that gives computers the ability to learn without being
explicitly programmed. Neural networks are built from layers of simple units; training adjusts
their weights with gradient descent so that the loss on the training data becomes smaller.
Attention lets every position look at every earlier position, which is why the memory of the
key-value cache grows with the length of the conversation. Paged memory management splits that
cache into fixed-size blocks, so sequences of different lengths can share one large pool.
Once upon a time, in a small village by the mountains, there lived an old carpenter who made
wooden toys for the children. Every morning he walked to the market, greeted his neighbours and
bought fresh bread. "Good morning!" they would say. "How are you today?" He always smiled.
Important: do not share your password with anyone. If you have any questions, please contact
our support team by email or phone. We are open Monday through Friday, from 9 a.m. to 6 p.m.

人工智能是计算机科学的一个分支，它试图理解智能的本质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。
该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。大语言模型通过海量文本进行训练，
能够理解和生成自然语言。用户可以通过对话的方式提出问题，模型会根据上下文给出回答。
春天来了，小草从地下探出头来，树上长出了嫩绿的叶子。孩子们在田野里奔跑，放着五颜六色的风筝。
请把下面这段话翻译成英文：“我明天早上八点要去机场接朋友。”
抱歉，我无法获取实时数据。根据已有的信息，明天可能会下雨，建议您出门时带上雨伞。
第一步，打开设置页面；第二步，选择网络选项；第三步，输入密码并点击确认按钮。

SELECT id, name, created_at FROM users WHERE status = 'active' ORDER BY created_at DESC LIMIT 10;
$ pip install -e . && python -m pytest -q tests/
git commit -m "Fix the scheduler when a request is aborted"

async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Output]:
    request = self.add_request(prompt, params)
    try:
        while not request.finished:
            yield await request.queue.get()
    except asyncio.CancelledError:
        self.abort(request.request_id)
        raise


struct Point {
    x: f64,
    y: f64,
}

impl Point {
    fn distance(&self, other: &Point) -> f64 {
        ((self.x - other.x).powi(2) + (self.y - other.y).powi(2)).sqrt()
    }
}

# Heading
- item one
- item two
**bold text** and `inline code` and [a link](https://example.com/docs/index.html).

{"data": [{"object": "model", "id": "glm-4-9b-chat", "owned_by": "glm4serve"}], "object": "list"}
{"error": {"message": "The model does not exist.", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
{"tool_calls": [{"id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Shanghai\"}"}}]}
'''

# Chinese characters for the seeded extra text: repeated enough that some get whole-character
# tokens and others only partial (2-byte) ones, so characters straddle tokens.
_EXTRA_HANZI = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现"


def _training_text(seed: int) -> str:
    rng = random.Random(seed)
    lines = [_CORPUS]
    # Seeded filler: JSON-ish lines and runs of common hanzi, so the merge counts (and so the
    # vocabulary) depend on the seed while staying fully deterministic for a given seed.
    keys = ["id", "name", "value", "count", "text", "index", "score", "items"]
    for _ in range(40):
        obj = {rng.choice(keys): rng.randint(0, 10_000) for _ in range(3)}
        lines.append(json.dumps(obj))
        lines.append("".join(rng.choice(_EXTRA_HANZI) for _ in range(rng.randint(4, 12))))
    return "\n".join(lines)


def _train_bpe(text: str, num_merges: int, byte_order: list[int]) -> list[bytes]:
    """Byte-level BPE training; returns the vocabulary as bytes, index = rank."""
    from tokenizers import Regex, pre_tokenizers

    splitter = pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated", invert=False)
    word_counts = Counter(piece for piece, _ in splitter.pre_tokenize_str(text))

    vocab: list[bytes] = [bytes([b]) for b in byte_order]
    rank_of: dict[bytes, int] = {b: r for r, b in enumerate(vocab)}
    words = [[rank_of[bytes([b])] for b in w.encode("utf-8")] for w in word_counts]
    counts = list(word_counts.values())

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (tokens, c) in enumerate(zip(words, counts)):
        for pair in zip(tokens, tokens[1:]):
            pair_count[pair] += c
            pair_words[pair].add(w)
    # max-heap on count; ties go to the smaller (left, right) ranks, so the result is deterministic
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    added = 0
    while added < num_merges and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:
            continue  # stale entry
        merged = vocab[a] + vocab[b]
        new = rank_of.get(merged)
        if new is None:  # the same bytes can come from two different pairs: keep one rank
            new = len(vocab)
            vocab.append(merged)
            rank_of[merged] = new
            added += 1
        touched: set[tuple[int, int]] = set()
        for w in sorted(pair_words.pop((a, b), ())):
            old, c = words[w], counts[w]
            out: list[int] = []
            i = 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == a and old[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(old[i])
                    i += 1
            if len(out) == len(old):
                continue
            for pair in zip(old, old[1:]):
                pair_count[pair] -= c
                touched.add(pair)
            for pair in zip(out, out[1:]):
                pair_count[pair] += c
                pair_words[pair].add(w)
                touched.add(pair)
            words[w] = out
        pair_count.pop((a, b), None)
        for pair in sorted(touched):
            c = pair_count.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, *pair))
            else:
                pair_count.pop(pair, None)
    return vocab


def write_small_tokenizer(out_dir: str | Path, num_merges: int = 2000, seed: int = 0) -> int:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json into `out_dir`.

    Returns the number of ids (BPE ranks + 14 special tokens). Fewer than `num_merges` merges
    are made only if the built-in corpus runs out of pairs.
    """
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_to_char = bytes_to_unicode()
    # single bytes in GPT-2 order (printable first), as in cl100k and GLM-4's own file
    vocab = _train_bpe(_training_text(seed), num_merges, list(byte_to_char))
    num_ranks = len(vocab)

    with open(out / "tokenizer.model", "w", encoding="ascii") as f:
        for rank, token in enumerate(vocab):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    rank_of = {token: rank for rank, token in enumerate(vocab)}
    merges: list[tuple[str, str]] = []
    for rank, token in enumerate(vocab):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(l, r) for l, r in splits if l in rank_of and r in rank_of]
        splits.sort(key=lambda lr: (rank_of[lr[0]], rank_of[lr[1]]))
        merges.extend((to_str(l), to_str(r)) for l, r in splits)

    hf = HFTokenizer(
        BPE({to_str(t): r for r, t in enumerate(vocab)}, merges, fuse_unk=False, ignore_merges=True)
    )
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in GLM4_SPECIAL_TOKENS])
    hf.save(str(out / "tokenizer.json"))

    added_tokens_decoder = {
        str(num_ranks + k): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for k, t in enumerate(GLM4_SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": list(GLM4_SPECIAL_TOKENS),
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 128000,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return num_ranks + len(GLM4_SPECIAL_TOKENS)
