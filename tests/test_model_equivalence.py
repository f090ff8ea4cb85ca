"""Our GLM-4 against transformers' GlmForCausalLM / Glm4ForCausalLM on the same random checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from glm4serve.model.batch import SeqChunk, build_batch
from glm4serve.engine.block_pool import BlockPool
from glm4serve.model.kv_cache import KVCache
from glm4serve.model.glm4 import load_model

CASES = [("glm", "small"), ("glm", "wide"), ("glm4", "small"), ("glm4", "wide")]
BLOCK = 4  # small blocks so that every test crosses many block boundaries


def close(ours: torch.Tensor, ref: torch.Tensor):
    """max |diff| <= 1e-4 relative to the logit scale"""
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * max(scale, 1.0), f"max abs diff {diff:.3g} at logit scale {scale:.3g}"


@pytest.fixture(scope="module")
def models(make_checkpoint):
    cache = {}

    def get(variant, shape):
        if (variant, shape) not in cache:
            path = make_checkpoint(variant, "hf", shape)
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[variant, shape] = (load_model(path, dtype=torch.float32), ref)
        return cache[variant, shape]

    return get


def ref_logits(ref, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float()  # [len, V]


class Seq:
    """One sequence in our paged cache, fed chunk by chunk."""

    def __init__(self, pool: BlockPool):
        self.pool, self.table, self.len = pool, [], 0

    def chunk(self, ids: list[int], want_logits=True) -> SeqChunk:
        need = self.pool.blocks_needed(self.len + len(ids)) - len(self.table)
        self.table += self.pool.allocate(need)
        c = SeqChunk(ids, self.len, list(self.table), want_logits)
        self.len += len(ids)
        return c


def run(model, kv, chunks, all_positions=False):
    b = build_batch(chunks, kv.block_size)
    if all_positions:
        b.logits_indices = torch.arange(len(b.input_ids))
    return model(b.input_ids, b.positions, b.attn, kv, b.logits_indices)


def fresh(model, num_blocks=256):
    return KVCache(model.cfg, num_blocks, BLOCK, torch.float32), BlockPool(num_blocks, BLOCK)


@pytest.mark.parametrize("variant,shape", CASES)
def test_full_prefill(models, variant, shape):
    ours, ref = models(variant, shape)
    ids = torch.randint(0, ours.cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    kv, pool = fresh(ours)
    close(run(ours, kv, [Seq(pool).chunk(ids)], all_positions=True), ref_logits(ref, ids))


@pytest.mark.parametrize("variant,shape", CASES)
def test_chunked_prefill_uneven_pieces_then_decode(models, variant, shape):
    ours, ref = models(variant, shape)
    ids = torch.randint(0, ours.cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = ref_logits(ref, ids)
    kv, pool = fresh(ours)
    seq, got, s = Seq(pool), [], 0
    for n in (7, 1, 13, 2, 19, 1, 1, 1, 15):  # uneven chunks, then token-by-token decode
        b_chunk = seq.chunk(ids[s : s + n])
        got.append(run(ours, kv, [b_chunk], all_positions=True))
        s += n
    assert s == len(ids)
    close(torch.cat(got), expected)


@pytest.mark.parametrize("variant,shape", CASES)
def test_batched_decode_of_sequences_of_different_lengths(models, variant, shape):
    ours, ref = models(variant, shape)
    g = torch.Generator().manual_seed(3)
    lengths = [3, 17, 9, 30, 1]
    prompts = [torch.randint(0, ours.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    steps = 4
    tails = [torch.randint(0, ours.cfg.vocab_size, (steps,), generator=g).tolist() for _ in lengths]
    kv, pool = fresh(ours)
    seqs = [Seq(pool) for _ in lengths]
    # all prompts prefilled together in one forward (a mix of spans and one single-token "decode")
    first = run(ours, kv, [s.chunk(p) for s, p in zip(seqs, prompts)])
    got = [[row] for row in first]
    for t in range(steps):  # then every sequence decodes one token per step, all in one batch
        rows = run(ours, kv, [s.chunk([tail[t]]) for s, tail in zip(seqs, tails)])
        for i, row in enumerate(rows):
            got[i].append(row)
    for i in range(len(lengths)):
        full = prompts[i] + tails[i]
        expected = ref_logits(ref, full)[len(prompts[i]) - 1 :]
        close(torch.stack(got[i]), expected)


def test_chatglm_and_hf_layouts_give_identical_logits(make_checkpoint):
    ids = list(range(5, 40))
    outs = []
    for layout, style in (("hf", "4.x"), ("chatglm", "4.x"), ("hf", "5.x")):
        path = make_checkpoint("glm", layout, "wide", config_style=style)
        model = load_model(path, dtype=torch.float32)
        kv, pool = fresh(model)
        outs.append(run(model, kv, [Seq(pool).chunk(ids)], all_positions=True))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("variant", ["glm", "glm4"])
def test_greedy_generation_matches_transformers_generate(models, variant):
    ours, ref = models(variant, "wide")
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    with torch.no_grad():
        expected = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    kv, pool = fresh(ours)
    seq, nxt, got = Seq(pool), prompt, []
    for _ in range(32):
        tok = int(run(ours, kv, [seq.chunk(nxt)])[0].argmax())
        got.append(tok)
        nxt = [tok]
    assert got == expected


@pytest.mark.parametrize("variant", ["glm", "glm4"])
def test_long_context_chunked_prefill_then_decode(models, variant):
    ours, ref = models(variant, "small")
    n = 3000
    ids = torch.randint(0, ours.cfg.vocab_size, (n + 8,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = ref_logits(ref, ids)
    kv, pool = fresh(ours, num_blocks=(n + 8) // BLOCK + 2)
    seq, got, s = Seq(pool), [], 0
    for size in (1024, 1024, 952):  # chunked prefill, logits of each chunk's last token
        got.append(run(ours, kv, [seq.chunk(ids[s : s + size])])); s += size
    for t in range(8):  # decode at positions 3000..3007
        got.append(run(ours, kv, [seq.chunk([ids[s]])])); s += 1
    idx = [1023, 2047, 2999] + list(range(3000, 3008))
    close(torch.cat(got), expected[idx])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(make_checkpoint, dtype):
    path = make_checkpoint("glm4", "hf", "small")
    ids = list(range(1, 50))
    out = {}
    for dt in (torch.float32, dtype):
        model = load_model(path, dtype=dt)
        assert next(model.parameters()).dtype == dt
        kv = KVCache(model.cfg, 64, BLOCK, dt)
        out[dt] = run(model, kv, [Seq(BlockPool(64, BLOCK)).chunk(ids)], all_positions=True)
    assert out[dtype].dtype == torch.float32  # logits always come back in fp32
    assert torch.isfinite(out[dtype]).all()
    assert (out[dtype] - out[torch.float32]).abs().max() < 0.05 * out[torch.float32].abs().max()
