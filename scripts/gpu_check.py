"""One-shot check of glm4serve's CUDA path on a lent GPU box (PASS/FAIL per check, with numbers).

Run from the repository root on the GPU machine (torch with CUDA preinstalled as `python3`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 scripts/gpu_check.py

(.whl/ holds cp312 wheels of what the server needs and that box lacks: fastapi and its
opentelemetry-api, starlette, uvicorn, pydantic(-core, -settings), sse-starlette, ...)

Locally, to test this script itself on CPU with tiny shapes (well under a minute):

    .venv/bin/python scripts/gpu_check.py --device cpu --quick

Checks (each group runs in its own subprocess with a time limit, so a hang, an out-of-memory
or a CUDA error that poisons the context costs one group, not the run):

  equiv   our GLM4Model vs transformers' GlmForCausalLM / Glm4ForCausalLM on the same random
          checkpoint, both on the device, variants glm and glm4: full prefill, chunked prefill +
          token-by-token decode through the paged KV cache, and 5 sequences of different lengths
          decoded together. float32: max|diff| <= 1e-4 x logit scale (the CPU tests' bound).
          bfloat16/float16: our error against transformers float32 must be no worse than
          max(3 x transformers' own error in that dtype, 0.02 x scale), and our top-1 agreement
          with float32 at most 0.15 below transformers' own.
  engine  build_llm_engine(..., device): float32 greedy 32 tokens == transformers generate();
          8 prompts together == one at a time; seeded sampling (temperature 0.8) the same alone
          and in a crowded batch; n=2; preemption with a tiny KV pool; every run ends with the KV
          pool fully free. bfloat16 batch invariance and greedy agreement: INFO only (bf16
          rounding legitimately depends on the batch shape).
  http    `python3 -m glm4serve.cli serve --device cuda --dtype bfloat16` on a random checkpoint
          with the default (automatic) KV budget: /health, /v1/models, chat (whole and SSE
          stream), /v1/completions, 8 concurrent chats, /metrics back to idle, SIGTERM -> exit 0.
  speed   INFO (figures, not pass/fail; an exception is a FAIL): a GLM-4-9B-wide model (hidden
          4096, 32 heads / 2 KV heads x 128, FFN 13696, vocab 151552) with only 6 layers, bf16,
          random weights built in GPU memory: our engine's decode tokens/s at batch 1 and 32 vs
          transformers generate() on the same weights; prefill of one 32K-token prompt (and 128K
          when time allows) with peak GPU memory.

Writes $OUT/gpu_check.json when $OUT is set (else prints only). Exit status 1 if any check FAILed.
Options: --only equiv,engine,http,speed (rerun some groups), --budget-s (whole run, default 225),
--device cpu --quick (this script's own test). Group time limits on CUDA: GPU_LIMITS below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GROUPS = ["equiv", "engine", "http", "speed"]
# Seconds each group may run (the speed group gets what is left of the budget, at most its cap).
GPU_LIMITS = {"equiv": 55, "engine": 45, "http": 60, "speed": 120}
CPU_LIMITS = {"equiv": 90, "engine": 90, "http": 90, "speed": 90}

# checkpoint shapes: "small"/"wide" as in tests/conftest.py; "gqa128" has glm-4-9b's heads
# (32 query heads over 2 KV heads of 128 dims) on a narrow residual stream
SHAPES = {
    "small": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "wide": dict(hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=32),
    "gqa128": dict(hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=32, num_kv_heads=2, head_dim=128),
}


# --------------------------------------------------------------------------------------------
# reporting (child side)


class Reporter:
    """Records of one group, printed as they come and rewritten to a JSON file after each, so the
    parent still has them if the group is killed on its time limit."""

    def __init__(self, group: str, path: str | None):
        self.group, self.path, self.records, self.env = group, path, [], None

    def _flush(self):
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"env": self.env, "checks": self.records}, f, indent=1, default=str)
            os.replace(tmp, self.path)

    def set_env(self, env: dict):
        self.env = env
        self._flush()

    def add(self, name, status, seconds, details=None, error=None):
        rec = {"group": self.group, "name": name, "status": status, "seconds": round(seconds, 2),
               "details": details or {}}
        if error:
            rec["error"] = error
        self.records.append(rec)
        print(format_record(rec), flush=True)
        if error:
            print(error, flush=True)
        self._flush()

    poisoned: str | None = None  # a CUDA error (device-side assert, illegal address) breaks the context

    def run(self, name, fn, *args, **kw):
        """fn(...) -> (status, details). An exception is a FAIL with its traceback."""
        if self.poisoned:
            self.add(name, "SKIP", 0, {"reason": f"CUDA context broken by {self.poisoned}"})
            return None
        print(f"... {name}", flush=True)
        t0 = time.perf_counter()
        try:
            status, details = fn(*args, **kw)
        except Exception:  # noqa: BLE001 - report and go on
            tb = traceback.format_exc()
            self.add(name, "FAIL", time.perf_counter() - t0, error=tb)
            if "CUDA error" in tb and "out of memory" not in tb:
                self.poisoned = name  # rerun with CUDA_LAUNCH_BLOCKING=1 to pin the kernel
            return None
        self.add(name, status, time.perf_counter() - t0, details)
        return details


def fmt(v):
    if isinstance(v, float):
        if v == 0 or math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e5) else f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) > 12:
        return f"[{', '.join(fmt(x) for x in v[:12])}, ... ({len(v)})]"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def format_record(rec) -> str:
    details = "  ".join(f"{k}={fmt(v)}" for k, v in rec["details"].items())
    return f"[{rec['status']}] {rec['group']}/{rec['name']}  ({rec['seconds']:.1f}s)  {details}".rstrip()


def collect_env(device: str) -> dict:
    import torch
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    return env


# --------------------------------------------------------------------------------------------
# shared helpers (child side)


class Ctx:
    def __init__(self, args):
        import torch

        self.device = args.device
        self.quick = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self._ckpts: dict = {}
        self.torch = torch

    def checkpoint(self, variant="glm", shape="small", **kw) -> Path:
        from glm4serve.model.random_checkpoint import write_random_checkpoint

        key = (variant, shape, tuple(sorted(kw.items())))
        if key not in self._ckpts:
            out = self.tmp / f"ckpt-{variant}-{shape}-{len(self._ckpts)}"
            kw.setdefault("rope_theta", 5e6)
            self._ckpts[key] = write_random_checkpoint(out, variant=variant, layout="hf", **SHAPES[shape], **kw)
        return self._ckpts[key]

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def hf_model(path, dtype, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device).eval()


# --------------------------------------------------------------------------------------------
# 1. model equivalence


class PagedSeq:
    """One sequence in our paged cache, fed chunk by chunk (as tests/test_model_equivalence.py)."""

    def __init__(self, pool):
        self.pool, self.table, self.len = pool, [], 0

    def chunk(self, ids, want_logits=True):
        from glm4serve.model.batch import SeqChunk

        need = self.pool.blocks_needed(self.len + len(ids)) - len(self.table)
        self.table += self.pool.allocate(need)
        c = SeqChunk(list(ids), self.len, list(self.table), want_logits)
        self.len += len(ids)
        return c


def equiv_group(ctx: Ctx, rep: Reporter):
    import torch

    from glm4serve.model.batch import build_batch
    from glm4serve.model.glm4 import load_model
    from glm4serve.model.kv_cache import BlockPool, KVCache

    dev = ctx.device
    shapes = ["small", "gqa128"] if ctx.quick else ["wide", "gqa128"]
    variants = ["glm", "glm4"]
    dtypes = ["float32", "bfloat16", "float16"]

    def run(model, kv, chunks, all_positions=False):
        b = build_batch(chunks, kv.block_size, dev)
        if all_positions:
            b.logits_indices = torch.arange(len(b.input_ids), device=dev)
        out = model(b.input_ids, b.positions, b.attn, kv, b.logits_indices)
        assert out.dtype == torch.float32, f"logits come back as {out.dtype}"
        assert out.device.type == torch.device(dev).type, f"logits on {out.device}"
        return out

    def ours_scenarios(model, block, dt, inputs):
        """Our logits of the three scenarios, float32 on the CPU."""
        res = {}
        nb = 256  # KV blocks, plenty for every scenario
        kv = KVCache(model.cfg, nb, block, torch_dtype(dt), dev)
        res["full"] = run(model, kv, [PagedSeq(BlockPool(nb, block)).chunk(inputs["full"])], True)
        kv = KVCache(model.cfg, nb, block, torch_dtype(dt), dev)
        seq, got, s = PagedSeq(BlockPool(nb, block)), [], 0
        for n in (7, 1, 13, 2, 19, 1, 1, 1, 15):  # uneven chunks, then token-by-token decode
            got.append(run(model, kv, [seq.chunk(inputs["chunked"][s : s + n])], True))
            s += n
        res["chunked"] = torch.cat(got)
        kv, pool = KVCache(model.cfg, nb, block, torch_dtype(dt), dev), BlockPool(nb, block)
        prompts, tails = inputs["batch"]
        seqs = [PagedSeq(pool) for _ in prompts]
        first = run(model, kv, [s.chunk(p) for s, p in zip(seqs, prompts)])  # all prefills in one forward
        rows = [[r] for r in first]
        for t in range(len(tails[0])):  # then every sequence decodes one token per step, together
            out = run(model, kv, [s.chunk([tail[t]]) for s, tail in zip(seqs, tails)])
            for i, r in enumerate(out):
                rows[i].append(r)
        res["batch"] = torch.cat([torch.stack(r) for r in rows])
        return {k: v.float().cpu() for k, v in res.items()}

    def ref_scenarios(ref, inputs):
        def logits(ids):
            with torch.no_grad():
                return ref(torch.tensor([ids], device=dev)).logits[0].float().cpu()

        prompts, tails = inputs["batch"]
        return {
            "full": logits(inputs["full"]),
            "chunked": logits(inputs["chunked"]),
            "batch": torch.cat([logits(p + t)[len(p) - 1 :] for p, t in zip(prompts, tails)]),
        }

    def rel_diff(a, b):
        scale = max(b.abs().max().item(), 1.0)
        return (a - b).abs().max().item() / scale

    def top1(a, b):
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    for variant in variants:
        for shape in shapes:
            block = 16 if shape == "gqa128" else 4
            path = ctx.checkpoint(variant, shape)
            from glm4serve.model.config import ModelConfig

            vocab = ModelConfig.from_dir(path).vocab_size
            g = torch.Generator().manual_seed(1)
            rnd = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
            lengths = [3, 17, 9, 30, 1]
            inputs = {"full": rnd(45), "chunked": rnd(60),
                      "batch": ([rnd(n) for n in lengths], [rnd(4) for _ in lengths])}
            refs: dict = {}

            def reference(dt):
                if dt not in refs:
                    model = hf_model(path, dt, dev)
                    refs[dt] = ref_scenarios(model, inputs)
                    del model
                return refs[dt]

            for dt in dtypes:
                def check(dt=dt):
                    truth = reference("float32")
                    model = load_model(path, dtype=dt, device=dev)
                    assert next(model.parameters()).dtype == torch_dtype(dt)
                    ours = ours_scenarios(model, block, dt, inputs)
                    del model
                    if dt == "float32":
                        diffs = {k: rel_diff(ours[k], truth[k]) for k in ours}
                        ok = all(d <= 1e-4 for d in diffs.values())
                        return ("PASS" if ok else "FAIL"), {
                            **{f"{k}_rel": v for k, v in diffs.items()}, "bound": 1e-4,
                            "top1_vs_hf": top1(torch.cat(list(ours.values())), torch.cat(list(truth.values()))),
                        }
                    same = reference(dt)
                    o, s, t = (torch.cat([x[k] for k in ("full", "chunked", "batch")]) for x in (ours, same, truth))
                    finite = bool(torch.isfinite(o).all())
                    ours_err = {k: rel_diff(ours[k], truth[k]) for k in ours}
                    hf_err = {k: rel_diff(same[k], truth[k]) for k in same}
                    bound = max(3 * max(hf_err.values()), 0.02)
                    t1_ours, t1_hf = top1(o, t), top1(s, t)
                    ok = finite and max(ours_err.values()) <= bound and t1_ours >= t1_hf - 0.15
                    return ("PASS" if ok else "FAIL"), {
                        "finite": finite,
                        "ours_err": ours_err, "hf_err": hf_err, "bound": bound,
                        "top1_ours_vs_fp32": t1_ours, "top1_hf_vs_fp32": t1_hf,
                        "top1_ours_vs_hf_same_dtype": top1(o, s),
                        "rows": int(o.shape[0]),
                    }

                rep.run(f"{variant}/{shape}/{dt}", check)
            refs.clear()
            if dev == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# 2. engine


def engine_group(ctx: Ctx, rep: Reporter):
    import torch

    from glm4serve.engine.engine import EngineConfig
    from glm4serve.engine.types import SamplingParams
    from glm4serve.server import build_llm_engine

    dev = ctx.device
    pool_checks: list[str] = []  # runs that ended with blocks still in use or errors

    def make(path, dtype="float32", **kw):
        cfg = dict(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128, block_size=16, num_blocks=128)
        cfg.update(kw)
        llm = build_llm_engine(path, EngineConfig(**cfg), dtype, device=dev)
        assert llm.runner.device.type == torch.device(dev).type, f"runner on {llm.runner.device}"
        state = {"min_gap": math.inf, "copies": 0}
        execute = llm.runner.execute

        def recording(out):  # the smallest gap between the best two logits: a tie vs a real mismatch
            state["copies"] += len(out.block_copies)
            logits = execute(out)
            if logits.shape[0]:
                top2 = logits.topk(2, dim=-1).values
                state["min_gap"] = min(state["min_gap"], float((top2[:, 0] - top2[:, 1]).min()))
            return logits

        llm.runner.execute = recording
        return llm, state

    def drive(llm, requests, label):
        for rid, prompt, params in requests:
            llm.add_request(rid, prompt, params)
        tokens: dict = {}
        for _ in range(5000):
            if not llm.has_work:
                break
            for o in llm.step():
                tokens.setdefault((o.request_id, o.index), []).extend(o.token_ids)
        errors = llm.pop_errors()
        free, total = llm.pool.num_free, llm.pool.num_blocks
        if llm.has_work or errors or free != total:
            pool_checks.append(f"{label}: has_work={llm.has_work} errors={errors} free={free}/{total}")
        if errors:
            raise AssertionError(f"{label}: engine errors {errors}")
        return tokens

    def rand_prompts(vocab, lengths, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]

    greedy = dict(temperature=0.0, ignore_eos=True)

    # a. greedy 32 tokens vs transformers generate(): float32 PASS/FAIL, bfloat16 INFO
    for variant, dt in (("glm", "float32"), ("glm4", "float32"), ("glm4", "bfloat16")):
        def greedy_vs_hf(variant=variant, dt=dt):
            path = ctx.checkpoint(variant, "wide")
            prompt = [11, 23, 5, 99, 42, 7, 64, 3]
            ref = hf_model(path, dt, dev)
            llm, st = make(path, dt)
            # our runner cuts the output layer's padding rows past the tokenizer; so must transformers
            padding = list(range(llm.tokenizer.vocab_size, ref.config.vocab_size))
            with torch.no_grad():
                ids = torch.tensor([prompt], device=dev)
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                   eos_token_id=None, pad_token_id=0, suppress_tokens=padding or None)
            expected = out[0, len(prompt):].tolist()
            del ref
            got = drive(llm, [("g", prompt, SamplingParams(max_tokens=32, **greedy))], f"greedy/{variant}")[("g", 0)]
            n = len(expected)  # transformers may stop early on a stop id; ours ignores eos
            first_diff = next((i for i in range(n) if got[i] != expected[i]), None)
            details = {"tokens_compared": n, "first_diff": first_diff, "min_top2_gap": st["min_gap"],
                       "ours": got[:8], "hf": expected[:8]}
            if dt != "float32":
                return "INFO", details
            return ("PASS" if n > 0 and first_diff is None else "FAIL"), details

        rep.run(f"greedy32_vs_transformers/{variant}/{dt}", greedy_vs_hf)

    # b. 8 prompts together == one at a time (float32 PASS/FAIL; bfloat16 INFO)
    lengths8 = (3, 40, 7, 19, 1, 25, 11, 60)
    for dt in ("float32", "bfloat16"):
        def together_vs_alone(dt=dt):
            path = ctx.checkpoint("glm4", "wide")
            llm, st = make(path, dt)
            prompts = rand_prompts(llm.tokenizer.vocab_size, lengths8, 2)
            params = SamplingParams(max_tokens=10, **greedy)
            reqs = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
            together = drive(llm, reqs, f"together/{dt}")
            alone = {}
            for r in reqs:
                one, _ = make(path, dt)
                alone.update(drive(one, [r], f"alone/{dt}/{r[0]}"))
            same = sum(together[k] == alone[k] for k in alone)
            agree = sum(a == b for k in alone for a, b in zip(together[k], alone[k])) / sum(len(v) for v in alone.values())
            details = {"requests_equal": f"{same}/{len(alone)}", "token_agreement": agree, "min_top2_gap": st["min_gap"]}
            if dt != "float32":
                return "INFO", details
            return ("PASS" if same == len(alone) else "FAIL"), details

        rep.run(f"8_prompts_together_eq_alone/{dt}", together_vs_alone)

    # c. seeded sampling does not depend on the rest of the batch
    def seeded():
        path = ctx.checkpoint("glm", "wide")
        sp = SamplingParams(max_tokens=16, temperature=0.8, seed=42, ignore_eos=True)
        s = ("s", [5, 6, 7, 8, 9], sp)
        alone1 = drive(make(path)[0], [s], "seeded/alone1")[("s", 0)]
        alone2 = drive(make(path)[0], [s], "seeded/alone2")[("s", 0)]
        others = [(f"o{i}", [20 + i] * (3 + 5 * i), SamplingParams(max_tokens=5 + i, temperature=0.7, ignore_eos=True))
                  for i in range(5)]
        crowded = drive(make(path, max_num_batched_tokens=24)[0], others[:2] + [s] + others[2:],
                        "seeded/crowded")[("s", 0)]
        greedy_out = drive(make(path)[0], [("g", [5, 6, 7, 8, 9], SamplingParams(max_tokens=16, **greedy))],
                           "seeded/greedy")[("g", 0)]
        ok = alone1 == alone2 == crowded
        return ("PASS" if ok else "FAIL"), {"alone_twice_equal": alone1 == alone2, "crowded_equal": crowded == alone1,
                                            "differs_from_greedy": alone1 != greedy_out, "tokens": alone1[:8]}

    rep.run("seeded_sampling_t0.8_batch_independent/float32", seeded)

    # d. n = 2
    def n2():
        path = ctx.checkpoint("glm", "wide")
        prompt = list(range(3, 13))  # 10 tokens: a partial shared block, copied on write
        llm, st = make(path, block_size=4, num_blocks=64)
        one = drive(llm, [("one", prompt, SamplingParams(max_tokens=9, **greedy))], "n2/one")[("one", 0)]
        llm2, st2 = make(path, block_size=4, num_blocks=64)
        two = drive(llm2, [("two", prompt, SamplingParams(max_tokens=9, n=2, **greedy))], "n2/greedy")
        sp = SamplingParams(max_tokens=12, n=2, temperature=0.8, seed=7, ignore_eos=True)
        s1 = drive(make(path, block_size=4, num_blocks=64)[0], [("s", prompt, sp)], "n2/seeded1")
        s2 = drive(make(path, block_size=4, num_blocks=64)[0], [("s", prompt, sp)], "n2/seeded2")
        ok = two[("two", 0)] == two[("two", 1)] == one and s1 == s2 and st2["copies"] >= 1
        return ("PASS" if ok else "FAIL"), {
            "greedy_choices_equal_n1": two[("two", 0)] == two[("two", 1)] == one, "block_copies": st2["copies"],
            "seeded_reproducible": s1 == s2, "seeded_choices_differ": s1[("s", 0)] != s1[("s", 1)]}

    rep.run("n2/float32", n2)

    # e. preemption with a tiny KV pool gives the same greedy tokens
    def preemption():
        path = ctx.checkpoint("glm", "small")
        prompts = rand_prompts(1000, (13, 10, 30, 5), 0)
        reqs = [("a", prompts[0], SamplingParams(max_tokens=12, **greedy)),
                ("n3", prompts[1], SamplingParams(max_tokens=9, n=3, **greedy)),
                ("b", prompts[2], SamplingParams(max_tokens=6, **greedy)),
                ("c", prompts[3], SamplingParams(max_tokens=14, **greedy))]
        roomy_llm, st1 = make(path, num_blocks=64, block_size=4, max_num_batched_tokens=512, max_model_len=64)
        roomy = drive(roomy_llm, reqs, "preempt/roomy")
        tight_llm, st2 = make(path, num_blocks=12, block_size=4, max_num_batched_tokens=7, max_model_len=48)
        tight = drive(tight_llm, reqs, "preempt/tight")
        pre = tight_llm.stats().num_preemptions_total
        ok = tight == roomy and pre > 0
        return ("PASS" if ok else "FAIL"), {"preemptions": pre, "equal": tight == roomy,
                                            "min_top2_gap": min(st1["min_gap"], st2["min_gap"])}

    rep.run("preemption_tiny_pool/float32", preemption)

    # f. every run above ended with its KV pool fully free and no errors
    def pools():
        return ("PASS" if not pool_checks else "FAIL"), {"bad_runs": pool_checks or "none"}

    rep.run("kv_pool_free_after_every_run", pools)


# --------------------------------------------------------------------------------------------
# 3. HTTP end to end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_group(ctx: Ctx, rep: Reporter):
    import httpx

    dev = ctx.device
    path = ctx.checkpoint("glm", "wide")
    name = "glm4-gpu-check"
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something, 你好"}]

    def start(extra: list[str]):
        port = free_port()
        log_path = ctx.tmp / f"server-{port}.log"
        cmd = [sys.executable, "-m", "glm4serve.cli", "serve", "--model", str(path), "--device", dev,
               "--dtype", "bfloat16" if dev == "cuda" else "float32", "--port", str(port),
               "--served-model-name", name, "--graceful-shutdown-seconds", "5", *extra]
        log = open(log_path, "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return proc, log, log_path, f"http://127.0.0.1:{port}"

    def wait_healthy(proc, log_path, url, timeout):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"not healthy after {timeout}s:\n{log_path.read_text()[-4000:]}")

    def stop(proc, log):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        return proc.returncode

    def metrics(url) -> dict:
        out = {}
        for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    # the default path on CUDA: no --kv-cache-memory (the budget is sized after the weights load)
    extra = [] if dev == "cuda" else ["--kv-cache-memory", "64MiB"]
    server = {}

    def startup():
        proc, log, log_path, url = start(extra)
        server.update(proc=proc, log=log, log_path=log_path, url=url)
        try:
            secs = wait_healthy(proc, log_path, url, 60 if dev == "cuda" else 80)
        except Exception:
            stop(proc, log)
            server.clear()
            raise
        kv_line = next((ln for ln in log_path.read_text().splitlines() if "blocks of" in ln), "")
        m = re.search(r"KV cache (\d+) blocks of (\d+) tokens \(([\d.]+) GiB\)", kv_line)
        return "PASS", {"healthy_after_s": secs, "kv_budget": "auto" if not extra else extra[1],
                        "kv_blocks": int(m.group(1)) if m else None, "kv_gib": float(m.group(3)) if m else None,
                        "log": kv_line.split(": ", 1)[-1]}

    rep.run("server_starts_" + ("auto_kv_budget" if dev == "cuda" else "64MiB_kv"), startup)
    if not server and dev == "cuda":  # still check HTTP with an explicit budget
        extra = ["--kv-cache-memory", "1GiB"]
        rep.run("server_starts_kv_1GiB (retry)", startup)
    if not server:
        rep.add("requests", "FAIL", 0, error="no server came up; HTTP requests not checked")
        return
    url, proc = server["url"], server["proc"]
    client = httpx.Client(base_url=url, timeout=60)
    whole_text = {}

    def models():
        r = client.get("/v1/models")
        ids = [m["id"] for m in r.json()["data"]]
        ok = r.status_code == 200 and ids == [name] and client.get("/health").status_code == 200
        return ("PASS" if ok else "FAIL"), {"status": r.status_code, "ids": ids}

    def chat():
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json={"model": name, "messages": msgs, "max_tokens": 16,
                                                      "temperature": 0})
        dt = time.perf_counter() - t0
        body = r.json()
        ch = body["choices"][0]
        whole_text["chat"] = ch["message"]["content"]
        ok = (r.status_code == 200 and isinstance(ch["message"]["content"], str)
              and ch["finish_reason"] in ("length", "stop") and 0 < body["usage"]["completion_tokens"] <= 16
              and body["usage"]["prompt_tokens"] > 0)
        return ("PASS" if ok else "FAIL"), {"status": r.status_code, "finish": ch["finish_reason"],
                                            "usage": body["usage"], "seconds": dt,
                                            "text": ch["message"]["content"][:40]}

    def stream():
        body = {"model": name, "messages": msgs, "max_tokens": 16, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        pieces, finish, usage, events, done, status = [], None, None, 0, False, None
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                events += 1
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    pieces.append(c["delta"].get("content") or "")
                    finish = c.get("finish_reason") or finish
        text = "".join(pieces)
        ok = status == 200 and done and events > 1 and finish in ("length", "stop") and usage is not None
        # bf16 + prefix cache hit (the prompt was just served) may legitimately change a near tie
        return ("PASS" if ok else "FAIL"), {"status": status, "events": events, "done": done, "finish": finish,
                                            "usage": usage, "same_text_as_whole": text == whole_text.get("chat")}

    def completions():
        r = client.post("/v1/completions", json={"model": name, "prompt": "Once upon a time", "max_tokens": 8,
                                                 "temperature": 0})
        body = r.json()
        ok = r.status_code == 200 and isinstance(body["choices"][0]["text"], str) and body["usage"]["completion_tokens"] > 0
        return ("PASS" if ok else "FAIL"), {"status": r.status_code, "usage": body.get("usage"),
                                            "text": body["choices"][0]["text"][:40]}

    def concurrent():
        def one(i):
            r = client.post("/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": f"request {i}: " + "word " * (3 * i)}],
                "max_tokens": 24, "temperature": 0.8, "seed": i, "ignore_eos": True})
            return r.status_code, (r.json().get("usage") or {}).get("completion_tokens")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            res = list(ex.map(one, range(8)))
        dt = time.perf_counter() - t0
        ok = all(s == 200 and n == 24 for s, n in res)
        return ("PASS" if ok else "FAIL"), {"results": res, "seconds": dt}

    def metrics_idle():
        t0 = time.monotonic()
        while True:
            m = metrics(url)
            idle = m.get("glm4serve:num_requests_running") == 0 and m.get("glm4serve:kv_cache_usage_perc") == 0
            if idle or time.monotonic() - t0 > 10:
                break
            time.sleep(0.2)
        keys = ["glm4serve:num_requests_running", "glm4serve:kv_cache_usage_perc", "glm4serve:generation_tokens_total",
                "glm4serve:prompt_tokens_total", "glm4serve:kv_cache_blocks_used"]
        ok = idle and m.get("glm4serve:generation_tokens_total", 0) > 8 * 24  # + the requests before
        return ("PASS" if ok else "FAIL"), {k.split(":")[1]: m.get(k) for k in keys}

    try:
        for n, fn in (("models_health", models), ("chat_whole", chat), ("chat_stream_sse", stream),
                      ("completions", completions), ("8_concurrent_chats", concurrent), ("metrics_idle", metrics_idle)):
            rep.run(n, fn)
    finally:
        client.close()

        def shutdown():
            code = stop(proc, server["log"])
            log_text = server["log_path"].read_text()
            tb = "Traceback" in log_text
            ok = code == 0 and not tb
            return ("PASS" if ok else "FAIL"), {"exit_code": code, "traceback_in_log": tb,
                                                "log_tail": log_text[-1500:] if not ok else ""}

        rep.run("sigterm_exit_0_no_traceback", shutdown)


# --------------------------------------------------------------------------------------------
# 4. speed figures


def speed_group(ctx: Ctx, rep: Reporter, deadline: float):
    import torch

    import glm4serve.model.loader as loader
    from glm4serve.engine.engine import EngineConfig
    from glm4serve.engine.types import SamplingParams
    from glm4serve.model.loader import checkpoint_tensors
    from glm4serve.server import build_llm_engine

    dev, quick = ctx.device, ctx.quick
    cuda = dev == "cuda"
    real_vocab = 151343  # glm-4-9b-chat's tokenizer; the output layer is padded to 151552
    if quick:
        dims = dict(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32,
                    vocab_size=4096, num_layers=2)
        real_vocab, prompt_len, new_tokens, batch, long_lens = 4000, 64, 8, 4, [512, 2048]
    else:
        dims = dict(hidden_size=4096, intermediate_size=13696, num_heads=32, num_kv_heads=2, head_dim=128,
                    vocab_size=151552, num_layers=6)
        prompt_len, new_tokens, batch, long_lens = 128, 64, 32, [32768, 131000]
    state: dict = {}

    def build():
        # a config-only checkpoint folder (config.json + the small tokenizer); weights come from
        # a transformers model made in device memory, copied into ours through the loader's name map
        tiny = ctx.checkpoint("glm", "small")
        big = ctx.tmp / "speed-model"
        big.mkdir(exist_ok=True)
        for f in tiny.iterdir():
            if not f.name.endswith(".safetensors"):
                shutil.copy(f, big / f.name)
        cfg = json.loads((tiny / "config.json").read_text())
        cfg.update(hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
                   num_attention_heads=dims["num_heads"], num_key_value_heads=dims["num_kv_heads"],
                   head_dim=dims["head_dim"], vocab_size=dims["vocab_size"], num_hidden_layers=dims["num_layers"],
                   max_position_embeddings=131072, rope_theta=5e6, torch_dtype="bfloat16")
        (big / "config.json").write_text(json.dumps(cfg, indent=1))

        from transformers import AutoConfig, AutoModelForCausalLM

        t0 = time.perf_counter()
        with torch.device(dev):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(big), dtype=torch.bfloat16)
        hf = hf.to(device=dev, dtype=torch.bfloat16).eval()
        g = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():
            for n, p in hf.named_parameters():  # as random_checkpoint: norms ~1, biases ~0.1, weights 0.02
                if n.endswith("norm.weight"):
                    p.normal_(1.0, 0.1, generator=g)
                elif n.endswith(".bias"):
                    p.normal_(0.0, 0.1, generator=g)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        sd = hf.state_dict()
        ctx.sync()
        t_hf = time.perf_counter() - t0

        real_load = loader.load_weights

        def from_memory(model, path, mcfg, dtype=None, device=None, progress=None):
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, spec in checkpoint_tensors(mcfg).items():
                    p = params[spec.target]
                    (p if spec.rows is None else p[spec.rows[0]:spec.rows[1]]).copy_(sd[name])

        loader.load_weights = from_memory  # load_model imports it at call time
        try:
            kv_bytes = (64 << 20) if quick else (4 << 30)
            llm = build_llm_engine(big, EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192, block_size=16,
                                                      kv_cache_memory_bytes=kv_bytes), "bfloat16", device=dev)
        finally:
            loader.load_weights = real_load
        # a vocabulary as wide as glm-4-9b-chat's, so logits copies and sampling cost what they would
        tok = llm.tokenizer
        tok._token_bytes = list(tok._token_bytes) + [b"~"] * (real_vocab - tok.vocab_size)
        tok.vocab_size = real_vocab
        llm.vocab_size = real_vocab
        llm.runner.vocab_limit = real_vocab
        state.update(hf=hf, llm=llm)
        # the weights made it across: next-token logits of one prompt, ours vs transformers (both bf16)
        from glm4serve.model.batch import SeqChunk, build_batch

        ids = torch.randint(0, real_vocab, (40,), generator=torch.Generator().manual_seed(5)).tolist()
        blocks = llm.pool.allocate(llm.pool.blocks_needed(len(ids)))
        try:
            b = build_batch([SeqChunk(ids, 0, blocks)], llm.pool.block_size, dev)
            ours = llm.runner.model(b.input_ids, b.positions, b.attn, llm.runner.kv, b.logits_indices)[0].float()
        finally:
            llm.pool.free(blocks)
        with torch.no_grad():
            ref = hf(torch.tensor([ids], device=dev)).logits[0, -1].float()
        rel = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
        same_top1 = int(ours.argmax()) == int(ref.argmax())
        ctx.sync()
        params = sum(p.numel() for p in llm.runner.model.parameters())
        return ("INFO" if rel < 0.1 else "FAIL"), {
            "layers": dims["num_layers"], "hidden": dims["hidden_size"], "params_B": params / 1e9,
            "ours_vs_hf_bf16_rel": rel, "same_top1": same_top1, "hf_build_s": t_hf,
            "gpu_alloc_gib": gib(torch.cuda.memory_allocated()) if cuda else None, "kv_blocks": llm.pool.num_blocks}

    def gib(x):
        return round(x / 2**30, 2)

    g = torch.Generator().manual_seed(123)

    def prompts(n, length):
        return [torch.randint(0, real_vocab, (length,), generator=g).tolist() for _ in range(n)]

    def ours_decode(b, n_new, label):
        llm = state["llm"]
        sp = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts(b, prompt_len)):
            llm.add_request(f"{label}-{i}", p, sp)
        got = {}
        t0 = time.perf_counter()
        t_first = None
        decoded, t_dec = 0, 0.0
        while llm.has_work:
            ts = time.perf_counter()
            outs = llm.step()
            te = time.perf_counter() - ts
            if t_first is not None:
                decoded += len(outs)
                t_dec += te
            for o in outs:
                got[o.request_id] = got.get(o.request_id, 0) + len(o.token_ids)
            if t_first is None and len(got) == b:
                t_first = time.perf_counter() - t0
        assert not llm.pop_errors() and llm.pool.num_free == llm.pool.num_blocks
        return t_first, decoded / t_dec if t_dec else float("nan")

    def hf_decode(b, n_new):
        hf = state["hf"]
        ids = torch.tensor(prompts(b, prompt_len), device=dev)
        mask = torch.ones_like(ids)

        def gen(n):
            ctx.sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
            ctx.sync()
            assert out.shape[1] == prompt_len + n
            return time.perf_counter() - t0

        t1 = gen(1)
        tn = gen(n_new + 1)
        return t1, b * n_new / (tn - t1)

    def decode_speed():
        ours_decode(2, 4, "warm")  # first kernels, cuBLAS handles, allocator
        hf_decode(2, 4)
        out = {}
        for b in (1, batch):
            ttft, tps = ours_decode(b, new_tokens, f"b{b}")
            out[f"ours_b{b}_tok_s"] = tps
            out[f"ours_b{b}_prefill_s"] = ttft
            t1, htps = hf_decode(b, new_tokens)
            out[f"hf_b{b}_tok_s"] = htps
            out[f"hf_b{b}_prefill_s"] = t1
            out[f"ratio_b{b}_ours_over_hf"] = tps / htps
        out.update(prompt_len=prompt_len, new_tokens=new_tokens)
        return "INFO", out

    def hf_prefill():
        n = long_lens[0]
        hf = state["hf"]
        ids = torch.tensor(prompts(1, n), device=dev)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ctx.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf(ids, logits_to_keep=1)
        ctx.sync()
        dt = time.perf_counter() - t0
        return "INFO", {"tokens": n, "seconds": dt, "tok_s": n / dt,
                        "peak_extra_gib": gib(torch.cuda.max_memory_allocated() - base) if cuda else None}

    def ours_prefill(n):
        llm = state["llm"]
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        llm.add_request(f"long{n}", prompts(1, n)[0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        steps = 0
        while llm.has_work:
            llm.step()
            steps += 1
        dt = time.perf_counter() - t0
        assert not llm.pop_errors() and llm.pool.num_free == llm.pool.num_blocks
        state[f"prefill{n}"] = dt
        return "INFO", {"tokens": n, "seconds": dt, "tok_s": n / dt, "steps": steps, "chunk": 8192,
                        "peak_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
                        "peak_extra_gib": gib(torch.cuda.max_memory_allocated() - base) if cuda else None}

    if rep.run("build_9b_wide_model", build) is None:
        return
    rep.run("decode_tokens_per_s", decode_speed)
    rep.run(f"transformers_prefill_{long_lens[0]}", hf_prefill)
    del state["hf"]
    if cuda:
        torch.cuda.empty_cache()
    rep.run(f"ours_prefill_{long_lens[0]}", ours_prefill, long_lens[0])
    t32 = state.get(f"prefill{long_lens[0]}")
    left = deadline - time.monotonic()
    # attention is quadratic: 4x the tokens costs 4x (linear layers) to 16x (attention) the time
    if t32 is None:
        rep.add(f"ours_prefill_{long_lens[1]}", "SKIP", 0, {"reason": "the shorter prefill did not finish"})
    elif t32 > 20 or 16 * t32 > left - 10:
        rep.add(f"ours_prefill_{long_lens[1]}", "SKIP", 0,
                {"reason": f"{long_lens[0]} took {t32:.1f}s; {left:.0f}s left in the budget"})
    else:
        rep.run(f"ours_prefill_{long_lens[1]}", ours_prefill, long_lens[1])


# --------------------------------------------------------------------------------------------
# child entry


def child_main(args):
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import logging

    logging.getLogger("glm4serve").setLevel(logging.ERROR)  # not "context capped ..." per tiny engine

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    rep = Reporter(args.child, args.result_file)
    rep.set_env(collect_env(args.device))
    if args.device == "cuda" and not torch.cuda.is_available():
        rep.add("cuda_available", "FAIL", 0, error="torch.cuda.is_available() is False")
        return 0
    ctx = Ctx(args)
    try:
        if args.child == "equiv":
            equiv_group(ctx, rep)
        elif args.child == "engine":
            engine_group(ctx, rep)
        elif args.child == "http":
            http_group(ctx, rep)
        elif args.child == "speed":
            speed_group(ctx, rep, time.monotonic() + args.time_left)
    except Exception:  # noqa: BLE001 - e.g. an import that failed: reported, not raised
        rep.add("group", "FAIL", 0, error=traceback.format_exc())
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------------
# parent


def run_group(group: str, args, limit: float, time_left: float) -> tuple[dict | None, list[dict], float, str]:
    fd, result_file = tempfile.mkstemp(prefix=f"gpu_check_{group}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, __file__, "--child", group, "--device", args.device, "--result-file", result_file,
           "--time-left", str(int(time_left)), "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    print(f"\n===== {group} (limit {limit:.0f}s) =====", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    note = ""
    try:
        proc.wait(timeout=limit)
        if proc.returncode != 0:
            note = f"exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
        note = f"killed after its {limit:.0f}s limit"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group and any server it started
        except ProcessLookupError:
            pass
        proc.wait()
    elapsed = time.monotonic() - t0
    env, records = None, []
    try:
        data = json.loads(Path(result_file).read_text() or "{}")
        env, records = data.get("env"), data.get("checks", [])
    except (OSError, json.JSONDecodeError):
        pass
    finally:
        Path(result_file).unlink(missing_ok=True)
        Path(result_file + ".tmp").unlink(missing_ok=True)
    if note:
        status = "SKIP" if group == "speed" and "limit" in note and records else "FAIL"
        rec = {"group": group, "name": "group_incomplete", "status": status, "seconds": round(elapsed, 1),
               "details": {"reason": note}}
        print(format_record(rec), flush=True)
        records.append(rec)
    return env, records, elapsed, note


def git_info() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--short")}


def parent_main(args) -> int:
    started = time.monotonic()
    limits = GPU_LIMITS if args.device == "cuda" else CPU_LIMITS
    groups = [g for g in (args.only.split(",") if args.only else GROUPS) if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"unknown groups {unknown}; choose from {GROUPS}", file=sys.stderr)
        return 2
    print(f"gpu_check: device={args.device} quick={args.quick} groups={groups} budget={args.budget_s}s", flush=True)
    env, checks, timings = None, [], {}
    for group in groups:
        left = args.budget_s - (time.monotonic() - started)
        if left < 15:
            rec = {"group": group, "name": "group", "status": "SKIP", "seconds": 0,
                   "details": {"reason": f"budget of {args.budget_s}s spent"}}
            print(format_record(rec), flush=True)
            checks.append(rec)
            continue
        limit = min(limits[group], left)
        e, recs, elapsed, _ = run_group(group, args, limit, limit)
        env = env or e
        checks.extend(recs)
        timings[group] = round(elapsed, 1)
    failed = [c for c in checks if c["status"] == "FAIL"]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "INFO", "SKIP")}
    total = time.monotonic() - started
    print("\n===== summary =====")
    if env:
        print("env: " + "  ".join(f"{k}={v}" for k, v in env.items()))
    for c in checks:
        print(format_record(c))
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['INFO']} info, {counts['SKIP']} skipped "
          f"in {total:.0f}s (groups: {timings})")
    if failed:
        print("FAILED: " + ", ".join(f"{c['group']}/{c['name']}" for c in failed))
    summary = {"ok": not failed, "counts": counts, "elapsed_s": round(total, 1), "group_seconds": timings,
               "env": env, "git": git_info(), "args": vars(args), "checks": checks}
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
        print(f"wrote {Path(out, 'gpu_check.json')}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (for checking this script on CPU)")
    p.add_argument("--only", default="", help=f"comma-separated groups out of {','.join(GROUPS)}")
    p.add_argument("--budget-s", type=float, default=225.0, help="wall-clock budget of the whole run")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (--device cpu)")
    p.add_argument("--child", choices=GROUPS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--time-left", type=float, default=120.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
