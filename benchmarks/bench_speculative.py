"""What speculative decoding by prompt lookup costs and gives, at glm-4-9b-chat's shapes (all the layers
of --model, full vocabulary, --quantization), in one process:

1. one forward of a decoding sequence with a draft of k tokens against k = 0 (its plain decode step),
   after a 512-token context, at 1 and 8 sequences: the price of checking a draft;
2. end to end, one engine with and without speculation taking turns (greedy, 1 and 8 streams,
   --new-tokens): tokens/s, the share of drafted tokens kept, and whether the tokens are the same;
3. (--attention) the attention of one short span at glm-4-9b's heads: in decode_attention.c
   (cpu_attention.py), and in PyTorch with its query groups folded (attention.py) and without;
4. (--lookup) one draft lookup that finds nothing (the engine thread's cost per decoding sequence and
   step) at long contexts, against the sliding-window search of commit b31de01 when git has it;
5. (--context N) part 1 alone after N cached tokens, the drafts' attention in decode_attention.c and in
   PyTorch taking turns (decodes in the kernel both ways).

Random weights repeat nothing of their context, and the gain depends on nothing else, so part 2 runs
a *steered* copy of the model: every layer as it is (the same work per token), but the embeddings of
a scripted document's tokens scaled up so that they dominate the residual stream, and an output layer
that maps each scripted token to its successor. Its greedy reply is then a script chosen here: the
prompt's document copied with an edit every --edit-every tokens (a real model editing a document,
quoting or extracting from its prompt), or never (pure copying). Edits every third token make every
draft wrong: the cost of speculation gone wrong. The acceptance is chosen, not a real model's; the
costs are measured.

    .venv/bin/python benchmarks/bench_speculative.py [--model DIR] [--quantization int8] [--repeats 5]
        [--attention | --lookup | --context N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model import attention, cpu_attention
from glm4serve.model.batch import ScheduledBatch, SeqChunk
from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint
from glm4serve.server import build_llm_engine

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
CONTEXT = 512
BLOCK = 16
DOC = 300  # tokens of each scripted document
SLICE = Path("~/.cache/glm4serve/bench-prefill-9b-2layers").expanduser()  # made by bench_prefill.py


def steered_copy(src: Path, dst: Path, script: list[int]) -> Path:
    """A checkpoint in `dst` whose greedy continuation of script[i] is script[i + 1]: src's shards
    linked, a new shard with its embedding and output layer, and an index that points to it for them."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(src / "model.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    names = {"embed": ("model.embed_tokens.weight", "transformer.embedding.word_embeddings.weight"),
             "head": ("lm_head.weight", "transformer.output_layer.weight"),
             "norm": ("model.norm.weight", "transformer.encoder.final_layernorm.weight")}
    found = {key: next(n for n in options if n in weight_map) for key, options in names.items()}
    w = {}
    for key, name in found.items():
        with safe_open(src / weight_map[name], "pt") as f:
            w[key] = f.get_tensor(name).float()
    emb, norm = w["embed"], w["norm"]
    emb[script] *= 1000.0  # the token's embedding outweighs every layer's output in the residual stream
    head = torch.zeros_like(w["head"])
    for a, b in zip(script, script[1:]):
        h = norm * emb[a] * torch.rsqrt(emb[a].pow(2).mean() + 1e-6)  # the final norm of that residual
        head[b] += 20.0 * h / h.norm()
    dst.mkdir(parents=True, exist_ok=True)
    for file in set(weight_map.values()):
        os.symlink(src / file, dst / file)
    for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                  "tokenizer_config.json"):
        if (src / extra).exists():
            os.symlink(src / extra, dst / extra)
    dtype = torch.bfloat16
    save_file({found["embed"]: emb.to(dtype), found["head"]: head.to(dtype)}, dst / "steered.safetensors",
              metadata={"format": "pt"})
    weight_map.update({found["embed"]: "steered.safetensors", found["head"]: "steered.safetensors"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def workloads(first: int, doc: int) -> dict[str, tuple[list[int], list[int]]]:
    """{name: (prompt, the steered model's reply)}, each over token ids of its own from `first` on: a
    document, and the reply copying it with an edit (a token of its own) every so many tokens."""
    out = {}
    for name, every in (("no edits", 0), ("an edit every 16 tokens", 16), ("an edit every 3rd token", 3)):
        document = list(range(first, first + doc))
        first += doc
        reply = []
        for j, t in enumerate(document):
            if every and j % every == every - 1:
                t, first = first, first + 1
            reply.append(t)
        out[name] = (document + reply[:1], reply)
    return out


def forward_ms(runner, seqs: int, k: int, repeats: int, context: int = CONTEXT, fill: bool = True) -> float:
    """Median time of one forward: `seqs` sequences, each with its real token and k drafted ones after
    a `context`-token cache (filled once, untimed, if `fill`; the K/V values do not change the time)."""
    width = -(-(context + 1 + k) // BLOCK)
    tables = [list(range(i * width, (i + 1) * width)) for i in range(seqs)]
    for t in tables if fill else []:
        runner.execute(ScheduledBatch([SeqChunk([7] * context, 0, t, want_logits=False)]))
    chunks = [SeqChunk([100 + j for j in range(1 + k)], context, t, all_logits=k > 0) for t in tables]
    runner.execute(ScheduledBatch(chunks))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute(ScheduledBatch(chunks))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def generate(engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[int], float]:
    """Greedy requests together to their ends: the first one's tokens, and tokens/s of them all from the
    step that gave every request its first token to the last."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"g{time.perf_counter_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    tokens, started, first = {}, set(), None
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            started.add(out.request_id)
        if first is None and len(started) == len(prompts):
            first, counted = time.perf_counter(), sum(map(len, tokens.values()))
    total = sum(map(len, tokens.values())) - counted
    return tokens[ids[0]], total / (time.perf_counter() - first)


def attention_table(repeats: int) -> None:
    """Part 3: prefill_attention of n queries after a context, bf16, glm-4-9b's heads: in decode_attention.c, and
    in PyTorch folded and not."""
    kernel = cpu_attention._kernel() is not None
    print(f"\n3. attention of one span, glm-4-9b's 32 query heads over 2 KV heads of 128, bf16, ms a layer "
          f"(median of {repeats}; decode_attention.c {'runs' if kernel else 'does not run'} here):\n")
    print("| cached tokens | queries | PyTorch, not folded | PyTorch, folded | decode_attention.c | kernel against "
          "the better PyTorch |")
    print("|---|---|---|---|---|---|")
    fold, takes_span = attention.FOLD_MAX_QUERIES, cpu_attention.takes_span
    for ctx in (512, 8192, 32768):
        nb = -(-ctx // BLOCK) + 1
        k_cache = torch.randn(nb, BLOCK, 2, 128, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        for n in (2, 5, 9, 32, 64):
            q = torch.randn(n, 32, 128, dtype=torch.bfloat16)
            span = attention.PrefillSpan(0, n, ctx, torch.arange(nb))
            ms = []
            for fold_limit, in_kernel in [(0, False), (10**6, False)] + [(0, True)] * kernel:
                attention.FOLD_MAX_QUERIES = fold_limit
                cpu_attention.takes_span = lambda n, q, k_cache, in_kernel=in_kernel: in_kernel
                attention.prefill_attention(q, k_cache, v_cache, span, 0.088)
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    attention.prefill_attention(q, k_cache, v_cache, span, 0.088)
                    times.append(time.perf_counter() - t0)
                ms.append(statistics.median(times) * 1000)
            cells = [f"{x:.2f}" for x in ms] + ["-"] * (3 - len(ms))
            ratio = f"{min(ms[:2]) / ms[2]:.2f}x" if kernel else "-"
            print(f"| {ctx} | {n} | " + " | ".join(cells) + f" | {ratio} |", flush=True)
    attention.FOLD_MAX_QUERIES, cpu_attention.takes_span = fold, takes_span


def long_context_table(model: Path, quantization: str, context: int, repeats: int) -> None:
    """Part 5: one forward with a draft of k tokens after `context` cached tokens, the drafts' attention in the
    kernel (as cpu_attention.takes_span has it) and in PyTorch (takes_span False) taking turns; the cache not
    filled (its values do not change the time: decode_attention.c reads to each sequence's length whatever it
    holds)."""
    if cpu_attention._kernel() is None:
        raise SystemExit("decode_attention.c does not run here")
    width = -(-(context + 9) // BLOCK)
    engine = build_llm_engine(EngineArgs(
        model=str(model), dtype="bfloat16", num_kv_blocks=8 * width + 1, max_num_seqs=16, block_size=BLOCK,
        enable_prefix_caching=False, quantization=None if quantization == "none" else quantization))
    print(f"{len(engine.runner.model.layers)}-layer glm-4-9b-chat shapes, {quantization}, {torch.get_num_threads()} "
          f"threads\n\n5. one forward after a {context}-token context, ms (median of {repeats}, the two ways taking "
          f"turns), k drafted tokens' attention in decode_attention.c / in PyTorch:\n")
    print("| sequences | k = 0 | " + " | ".join(f"k = {k}" for k in (1, 2, 4, 8)) + " |")
    print("|---|---|---|---|---|---|")
    takes_span = cpu_attention.takes_span
    for seqs in (1, 8):
        ms = {}
        for _ in range(repeats):
            for k in (0, 1, 2, 4, 8):
                for kernel in (True, False) if k else (True,):
                    cpu_attention.takes_span = takes_span if kernel else lambda n, q, k_cache: False
                    ms.setdefault((k, kernel), []).append(forward_ms(engine.runner, seqs, k, 1, context, fill=False))
        cpu_attention.takes_span = takes_span
        med = {key: statistics.median(v) for key, v in ms.items()}
        cells = [f"{med[0, True]:.1f}"] + [
            f"{med[k, True]:.1f} / {med[k, False]:.1f} ({med[k, False] / med[k, True]:.2f}x)" for k in (1, 2, 4, 8)]
        print(f"| {seqs} | " + " | ".join(cells) + " |", flush=True)


def lookup_table(repeats: int) -> None:
    """Part 4: ngram_draft over a growing Sequence.token_array, and b31de01's search over the token list."""
    import subprocess
    import types

    from glm4serve.engine.sequence import Sequence
    from glm4serve.engine.speculative import ngram_draft

    old = types.ModuleType("old_speculative")
    source = subprocess.run(["git", "show", "b31de01:glm4serve/engine/speculative.py"], capture_output=True,
                            text=True)
    if source.returncode == 0:
        exec(source.stdout, old.__dict__)
    print(f"\n4. one lookup that finds nothing (2- to 4-grams), ms (mean of {repeats}):\n")
    print("| context tokens | now | b31de01 |")
    print("|---|---|---|")
    rng = torch.Generator().manual_seed(0)
    for size in (4096, 32768, 131072):
        seq = Sequence(0, "r", 0, torch.randint(0, 150000, (size,), generator=rng).tolist(), SamplingParams())
        seq.token_array()
        draws = torch.randint(0, 150000, (2 * repeats,), generator=rng).tolist()
        t0 = time.perf_counter()
        for t in draws[:repeats]:
            seq.output_token_ids.append(t)
            ngram_draft(seq.token_array(), 4, 2, 4)
        now = (time.perf_counter() - t0) / repeats * 1000
        before = "-"
        if hasattr(old, "ngram_draft"):
            t0 = time.perf_counter()
            for t in draws[repeats:]:
                seq.output_token_ids.append(t)
                old.ngram_draft(seq.all_token_ids, 4, 2, 4)
            before = f"{(time.perf_counter() - t0) / repeats * 1000:.2f}"
        print(f"| {size} | {now:.3f} | {before} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, help="a checkpoint with glm-4-9b's shapes (default: a 2-layer slice)")
    ap.add_argument("--quantization", default="int8", choices=["int8", "int4", "none"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--attention", action="store_true", help="part 3 alone")
    ap.add_argument("--lookup", action="store_true", help="part 4 alone")
    ap.add_argument("--context", type=int, help="part 5 alone: part 1 after this many cached tokens")
    a = ap.parse_args()
    if a.attention:
        return attention_table(max(a.repeats, 20))
    if a.lookup:
        return lookup_table(max(a.repeats, 20))
    if a.context:
        return long_context_table(a.model or SLICE, a.quantization, a.context, a.repeats)
    with tempfile.TemporaryDirectory() as d:
        src = a.model or (SLICE if SLICE.is_dir() else write_random_checkpoint(
            Path(d) / "slice", **{**GLM4_9B_CHAT, "dtype": "bfloat16", "num_layers": 2}))
        work = workloads(100, DOC)
        path = steered_copy(src, Path(d) / "steered", [t for w in work.values() for t in w[1]])
        engine = build_llm_engine(EngineArgs(
            model=str(path), dtype="bfloat16", kv_cache_memory="1GiB", max_num_seqs=16, block_size=BLOCK,
            enable_prefix_caching=False, quantization=None if a.quantization == "none" else a.quantization,
            speculative_config=SPEC))
        speculative = engine.scheduler.cfg
        plain = dataclasses.replace(speculative, speculative=None)
        print(f"{len(engine.runner.model.layers)}-layer glm-4-9b-chat shapes, {a.quantization}, "
              f"{torch.get_num_threads()} threads, drafts of up to {SPEC['num_speculative_tokens']} tokens "
              f"(n-grams of {SPEC['prompt_lookup_min']} to {SPEC['prompt_lookup_max']})\n")

        print(f"1. one forward after a {CONTEXT}-token context, ms (median of {a.repeats}):\n")
        print("| sequences | k = 0 | " + " | ".join(f"k = {k}" for k in (1, 2, 4, 8)) + " |")
        print("|---|---|---|---|---|---|")
        for seqs in (1, 8):
            base = forward_ms(engine.runner, seqs, 0, a.repeats)
            cells = [f"{base:.1f}"]
            for k in (1, 2, 4, 8):
                ms = forward_ms(engine.runner, seqs, k, a.repeats)
                cells.append(f"{ms:.1f} ({ms / base:.2f}x)")
            print(f"| {seqs} | " + " | ".join(cells) + " |", flush=True)

        print(f"\n2. end to end, greedy, {a.new_tokens} new tokens after a {DOC + 1}-token prompt (median of "
              f"{a.repeats}; the steered model's reply copies the prompt's document):\n")
        print("| streams | reply | plain tokens/s | speculative tokens/s | ratio | drafted tokens kept | same tokens |")
        print("|---|---|---|---|---|---|---|")
        for streams, name in [(1, name) for name in work] + [(8, name) for name in list(work)[1:]]:
            prompt, reply = work[name]
            rates = {False: [], True: []}
            drafted, kept = engine.spec_draft_tokens, engine.spec_accepted_tokens
            same = True
            for _ in range(a.repeats):
                engine.scheduler.cfg = plain
                want, r = generate(engine, [prompt] * streams, a.new_tokens)
                rates[False].append(r)
                if want != reply[1 : 1 + a.new_tokens]:
                    raise SystemExit(f"the steered model does not follow its script: {want[:8]} ...")
                engine.scheduler.cfg = speculative
                got, r = generate(engine, [prompt] * streams, a.new_tokens)
                rates[True].append(r)
                same &= got == want
            drafted, kept = engine.spec_draft_tokens - drafted, engine.spec_accepted_tokens - kept
            p, s = statistics.median(rates[False]), statistics.median(rates[True])
            share = f"{kept}/{drafted} ({kept / drafted:.0%})" if drafted else "none drafted"
            print(f"| {streams} | {name} | {p:.2f} | {s:.2f} | {s / p:.2f}x | {share} | {same} |", flush=True)


if __name__ == "__main__":
    main()
