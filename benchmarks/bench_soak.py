"""A soak of the HTTP server: a random mix of requests from several clients for a while, then idle.
Prints the server's resident memory over time and what every request got; fails (exit 1) on any
5xx, a client error other than an HTTP status, or engine gauges that do not return to 0.

    .venv/bin/python benchmarks/bench_soak.py [--layers 2] [--quantization int8] [--seconds 300]
        [--kv-cache-memory 2GiB] [--scheduling-policy priority] [--lora] [--speculative]

The checkpoint has glm-4-9b-chat's shapes (hidden 4096, FFN 13696, 32 heads / 2 KV groups, vocab
151,552), random bf16 weights, --layers of its 40 layers, with the project's small tokenizer (so
token ids past ~2.3K are out of its vocabulary: those requests are 400s by design). The mix: chat
with and without streaming, n up to 3, logprobs, stop strings, seeds, penalties, logit_bias; text
and token-id completions with echo; tools with each tool_choice; json_schema and json_object
replies; prompts scored as evaluation harnesses score them (echo, logprobs, max_tokens 0 or 1, vLLM's
prompt_logprobs); vLLM's guided_choice / guided_regex / guided_json / structured_outputs; chat that
continues a final assistant message; truncate_prompt_tokens and continuous usage; /tokenize and
/detokenize; streams the client leaves after a few events; prompts of up to ~10K tokens; and invalid
requests. With --scheduling-policy priority, half the requests also carry a priority; with --lora, half
name a LoRA adapter (rank 16, every linear) as their model; with --speculative, the server drafts by prompt
lookup (up to 4 tokens), so drafts are checked, kept and cut among the mix.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_proc import ServerProcess  # noqa: E402

from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_adapter, write_random_checkpoint  # noqa: E402

MODEL = "soak"
LORA = "soak-lora"
WORDS = ["hello", "世界", "天气", "weather", "the", "a", "🙂", "json", "tool", "北京", "xxxxxxx", "é", "\n"]
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used")
DRAFTS = ("spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total")  # printed, not checked


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Mix:
    """Random request bodies, from one seeded generator."""

    def __init__(self, seed: int, priorities: bool = False, lora: bool = False):
        self.rng = random.Random(seed)
        self.priorities = priorities  # half the requests carry a priority (the server's policy is "priority")
        self.lora = lora  # half the requests name the LoRA adapter as their model

    def model(self) -> str:
        return LORA if self.lora and self.rng.random() < .5 else MODEL

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def sampling(self, fields: tuple[str, ...] | None = None) -> dict:
        """Some of the sampling fields (of `fields` only: what the Responses and Messages APIs take)."""
        r = self.rng
        options = [  # (how often, field, value)
            (.5, "temperature", lambda: r.choice([0, 0.5, 1.0, 1.5])), (.3, "top_p", lambda: r.choice([0.1, 0.9, 1.0])),
            (.2, "top_k", lambda: r.choice([1, 5, 50])), (.2, "min_p", lambda: 0.05),
            (.2, "presence_penalty", lambda: 0.5), (.2, "frequency_penalty", lambda: 0.5),
            (.1, "repetition_penalty", lambda: 1.2), (.3, "seed", lambda: r.randrange(1 << 30)),
            (.2, "stop", lambda: [self.words(1), "".join(r.choices(string.ascii_letters, k=r.randint(1, 30)))]),
            (.15, "logit_bias", lambda: {str(r.randrange(2000)): r.choice([-100, 5, 100]) for _ in range(3)}),
            (.2, "n", lambda: r.randint(2, 3)), (.1, "ignore_eos", lambda: True),
        ]
        if self.priorities:
            options.append((.5, "priority", lambda: r.randint(-2, 5)))
        return {field: value() for often, field, value in options
                if r.random() < often and (fields is None or field in fields)}

    def schema(self) -> dict:
        props = {f"f{self.rng.randrange(10**9)}": {"type": self.rng.choice(["string", "integer", "boolean"])}
                 for _ in range(self.rng.randint(1, 3))}
        return {"type": "object", "properties": props, "required": list(props)}

    def request(self) -> tuple[str, str, dict]:
        """(kind, path, body)"""
        r = self.rng
        kind = r.choices(["chat", "comp", "tools", "json", "jsonobj", "tok", "bad", "disconnect", "long", "score",
                          "guided", "continue", "responses", "messages"],
                         [30, 15, 10, 8, 4, 5, 8, 10, 3, 6, 6, 3, 8, 6])[0]
        stream, max_tokens = r.random() < .5, r.randint(1, 24)
        user = lambda n: [{"role": "user", "content": self.words(n)}]  # noqa: E731
        if kind in ("chat", "disconnect", "long"):
            msgs = [{"role": "system", "content": self.words(5)}] if r.random() < .3 else []
            for _ in range(r.randint(1, 3)):
                msgs += user(r.randint(1, 1500 if kind == "long" else 40))
                msgs.append({"role": "assistant", "content": self.words(5)})
            body = {"messages": msgs[:-1], "max_tokens": max_tokens, "stream": stream or kind == "disconnect",
                    **self.sampling()}
            if r.random() < .3:
                body.update(logprobs=True, top_logprobs=r.randint(0, 5))
            if body["stream"] and r.random() < .5:
                body["stream_options"] = {"include_usage": True, "continuous_usage_stats": r.random() < .5}
            if r.random() < .1:
                body["truncate_prompt_tokens"] = r.choice([-1, 16, 200])
            if not body["stream"] and r.random() < .1:
                body["prompt_logprobs"] = r.randint(0, 3)
            return kind, "/v1/chat/completions", body
        if kind == "comp":
            prompt = self.words(r.randint(1, 30)) if r.random() < .7 else [r.randrange(2000) for _ in range(50)]
            body = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, **self.sampling()}
            if r.random() < .3:
                body["logprobs"] = r.randint(0, 5)
            if r.random() < .2 and not stream:
                body["echo"] = True
            return kind, "/v1/completions", body
        if kind == "tools":
            tools = [{"type": "function", "function": {"name": f"fn_{r.randrange(10**9)}", "description": self.words(4),
                                                       "parameters": self.schema()}} for _ in range(r.randint(1, 3))]
            choice = r.choice(["auto", "required", "none",
                               {"type": "function", "function": {"name": tools[0]["function"]["name"]}}])
            return kind, "/v1/chat/completions", {"messages": user(8), "tools": tools, "tool_choice": choice,
                                                  "max_tokens": r.randint(8, 48), "stream": stream, **self.sampling()}
        if kind in ("json", "jsonobj"):
            fmt = ({"type": "json_schema", "json_schema": {"name": "s", "schema": self.schema()}} if kind == "json"
                   else {"type": "json_object"})
            return kind, "/v1/chat/completions", {"messages": user(8), "response_format": fmt,
                                                  "max_tokens": r.randint(8, 48), "stream": stream, **self.sampling()}
        if kind == "score":  # how evaluation harnesses score text: echo, logprobs, max_tokens 0 or 1
            n = r.choice([20, 200, 1200])
            prompt = self.words(n) if r.random() < .5 else [[r.randrange(2000) for _ in range(n)]
                                                           for _ in range(r.randint(1, 4))]
            body = {"prompt": prompt, "echo": True, "logprobs": r.randint(0, 2), "max_tokens": r.choice([0, 1]),
                    "temperature": 0, "stream": stream}
            if not stream and r.random() < .3:
                body["prompt_logprobs"] = 1
            return kind, "/v1/completions", body
        if kind == "guided":
            constraint = r.choice([{"guided_choice": ["yes", "no", "不知道"]}, {"guided_regex": "[0-9]{1,4}-[a-z]{2}"},
                                   {"structured_outputs": {"grammar": 'root ::= ("ab" | "c")+'}},
                                   {"guided_json": self.schema()}, {"structured_outputs": {"choice": ["x", "y"]}}])
            if r.random() < .5:
                return kind, "/v1/chat/completions", {"messages": user(8), "max_tokens": r.randint(4, 32),
                                                      "stream": stream, **constraint, **self.sampling()}
            return kind, "/v1/completions", {"prompt": self.words(8), "max_tokens": r.randint(4, 32),
                                             "stream": stream, **constraint, **self.sampling()}
        if kind == "continue":
            msgs = user(r.randint(1, 30)) + [{"role": "assistant", "content": self.words(r.randint(1, 6))}]
            return kind, "/v1/chat/completions", {"messages": msgs, "continue_final_message": True,
                                                  "max_tokens": max_tokens, "stream": stream, **self.sampling()}
        if kind == "responses":  # streamed, whole, or run in the background (polled by nobody: it runs alone)
            body = {"input": self.words(r.randint(1, 40)), "max_output_tokens": max(max_tokens, 16), "stream": stream,
                    "background": r.random() < .25, **self.sampling(("temperature", "top_p", "top_k", "seed"))}
            if r.random() < .3:
                body["tools"] = [{"type": "function", "name": "fn", "parameters": self.schema()}]
            return kind, "/v1/responses", body
        if kind == "messages":  # Anthropic's
            return kind, "/v1/messages", {"messages": user(r.randint(1, 40)), "max_tokens": max_tokens,
                                          "stream": stream, **self.sampling(("temperature", "top_p", "top_k"))}
        if kind == "tok":
            if r.random() < .5:
                return kind, "/tokenize", {"prompt": self.words(r.randint(1, 200))}
            return kind, "/detokenize", {"tokens": [r.randrange(2000) for _ in range(r.randint(1, 200))]}
        bad = r.choice([{"messages": []}, {"messages": [{"role": "user"}]}, {"prompt": "x", "max_tokens": -1},
                        {"messages": user(1), "n": 0},
                        {"messages": user(1), "response_format": {"type": "json_schema",
                                                                   "json_schema": {"name": "x", "schema": {"type": "?"}}}},
                        {"prompt": "x" * 50000, "max_tokens": 10}])
        return "bad", "/v1/completions" if "prompt" in bad else "/v1/chat/completions", bad


async def one(client: httpx.AsyncClient, url: str, mix: Mix, counts: dict) -> None:
    kind, path, body = mix.request()
    body["model"] = mix.model()
    try:
        if body.get("stream"):
            async with client.stream("POST", url + path, json=body) as resp:
                leave_after = mix.rng.randint(1, 4) if kind == "disconnect" else None
                events = 0
                async for _ in resp.aiter_lines():
                    events += 1
                    if leave_after and events >= leave_after:
                        break
                status = resp.status_code
        else:
            status = (await client.post(url + path, json=body)).status_code
    except httpx.HTTPError as e:
        status = type(e).__name__
    counts[kind, status] = counts.get((kind, status), 0) + 1


async def gauges(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    out = {}
    for line in (await client.get(url + "/metrics")).text.splitlines():
        name, _, value = line.partition(" ")
        name = name.partition("{")[0].removeprefix("glm4serve:")  # the model_name label aside
        if name in GAUGES + DRAFTS:
            out[name] = float(value)
    return out


async def soak(url: str, pid: int, seconds: float, clients: int, idle: float, seed: int,
               priorities: bool, lora: bool) -> tuple[dict, list, dict]:
    counts: dict = {}
    samples: list[tuple[float, float]] = []  # (seconds since start, RSS MiB)
    t0 = time.monotonic()
    end = t0 + seconds

    async def client_loop(client, mix):
        while time.monotonic() < end:
            await one(client, url, mix, counts)

    async def sampler():
        while time.monotonic() < end:
            samples.append((time.monotonic() - t0, rss_mib(pid)))
            await asyncio.sleep(min(15.0, max(0.0, end - time.monotonic())))

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(sampler(), *(client_loop(client, Mix(seed + i, priorities, lora)) for i in range(clients)))
        samples.append((time.monotonic() - t0, rss_mib(pid)))  # the load's end
        await asyncio.sleep(idle)
        samples.append((time.monotonic() - t0, rss_mib(pid)))
        settled = await gauges(client, url)
    return counts, samples, settled


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2, help="of glm-4-9b-chat's 40")
    ap.add_argument("--quantization", choices=["none", "int8", "int4"], default="int8")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--idle", type=float, default=5, help="seconds idle after the load, before the last sample")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--kv-cache-memory", default="2GiB", help="the KV budget: a small one is all touched early, "
                                                             "so what RSS does after that is the rest's")
    ap.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                    help="priority: the mix also sends request priorities from -2 to 5")
    ap.add_argument("--lora", action="store_true", help="serve a rank-16 LoRA adapter too, and name it as the "
                                                         "model of half the requests")
    ap.add_argument("--speculative", action="store_true", help="serve with drafts by prompt lookup (up to 4 tokens)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(d, **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": a.layers})
        args = ["--served-model-name", MODEL, "--max-model-len", "16384", "--kv-cache-memory", a.kv_cache_memory,
                "--scheduling-policy", a.scheduling_policy]
        if a.lora:
            args += ["--lora-modules", f"{LORA}={write_random_adapter(Path(d) / 'lora', d, rank=16, alpha=32.0)}"]
        if a.quantization != "none":
            args += ["--quantization", a.quantization]
        if a.speculative:
            args += ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}']
        server = ServerProcess(Path(d), *args, dtype="auto", kv_cache_memory=None).wait_healthy(timeout=600)
        try:
            loaded = rss_mib(server.proc.pid)
            counts, samples, settled = asyncio.run(soak(server.url, server.proc.pid, a.seconds, a.clients, a.idle,
                                                        a.seed, a.scheduling_policy == "priority", a.lora))
        finally:
            server.stop()
    total = sum(counts.values())
    failures = {k: v for k, v in counts.items() if not isinstance(k[1], int) or k[1] >= 500}
    print(f"{a.layers} of glm-4-9b-chat's layers, {a.quantization}, {a.clients} clients for {a.seconds:.0f} s: "
          f"{total} requests, {sum(v for k, v in counts.items() if k[1] == 200)} answered 200")
    for (kind, status), n in sorted(counts.items(), key=str):
        print(f"  {kind:10s} {status}: {n}")
    print("RSS MiB: loaded %.0f; " % loaded + ", ".join(f"{t:.0f} s {m:.0f}" for t, m in samples))
    peak = max(m for _, m in samples[:-1])
    print(f"RSS peak under load {peak:.0f} MiB, at the load's end {samples[-2][1]:.0f}, after {a.idle:.0f} s idle "
          f"{samples[-1][1]:.0f}; gauges after idle {settled}")
    ok = not failures and all(settled.get(name) == 0 for name in GAUGES)
    print("OK" if ok else f"FAILED: {failures or settled}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
