"""Our GLM-4 against transformers' GlmForCausalLM / Glm4ForCausalLM on the same random checkpoints,
both on the test device (`--device`); in half precision too on a GPU (tolerances: conftest.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from glm4serve.model.batch import SeqChunk, build_batch
from glm4serve.engine.block_pool import BlockPool
from glm4serve.model.kv_cache import KVCache
from glm4serve.model.glm4 import load_model

CASES = [("glm", "small"), ("glm", "wide"), ("glm4", "small"), ("glm4", "wide")]
# on a GPU also glm-4-9b's attention shape: the SDPA kernels CUDA picks depend on the head size
GPU_CASES = [("glm", "gqa128"), ("glm4", "gqa128")]
BLOCK = 4  # small blocks so that every test crosses many block boundaries


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        cuda = metafunc.config.getoption("--device") == "cuda"
        metafunc.parametrize("variant,shape", CASES + (GPU_CASES if cuda else []))


class Reference:
    """transformers on the same checkpoint and device: float32 is the truth; a half dtype's own
    error (what rounding alone costs) sets how far ours may be from it in that dtype."""

    def __init__(self, path, device: str, tolerances):
        self.path, self.device, self.tolerances = path, device, tolerances
        self.models: dict = {}

    def model(self, dtype: str = "float32"):
        if dtype not in self.models:
            hf = AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, dtype))
            self.models[dtype] = hf.to(self.device).eval()
        return self.models[dtype]

    def logits(self, ids: list[int], dtype: str = "float32") -> torch.Tensor:
        with torch.no_grad():
            return self.model(dtype)(torch.tensor([ids], device=self.device)).logits[0].float().cpu()  # [len, V]

    def check(self, ours: torch.Tensor, dtype: str, sequences: list[tuple[list[int], object]]):
        """ours: our logits (in dtype) of the rows of each (ids, rows) in turn; rows index positions of ids."""
        def rows(dt):
            return torch.cat([self.logits(ids, dt)[r] for ids, r in sequences])

        same = None if dtype == "float32" else rows(dtype)
        self.tolerances[dtype].assert_close(ours, rows("float32"), same)


@pytest.fixture(scope="module")
def models(make_checkpoint, device, tolerances):
    """models(variant, shape, dtype="float32") -> (our model in dtype, the Reference), on the device."""
    ours, refs = {}, {}

    def get(variant, shape, dtype="float32"):
        path = make_checkpoint(variant, "hf", shape)
        if (variant, shape) not in refs:
            refs[variant, shape] = Reference(path, device, tolerances)
        if (variant, shape, dtype) not in ours:
            ours[variant, shape, dtype] = load_model(path, dtype=dtype, device=device)
        return ours[variant, shape, dtype], refs[variant, shape]

    return get


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
    """Our logits of the chunks, float32 on the CPU."""
    device = kv.k[0].device
    b = build_batch(chunks, kv.block_size, device)
    if all_positions:
        b.logits_indices = torch.arange(len(b.input_ids), device=device)
    out = model(b.input_ids, b.positions, b.attn, kv, b.logits_indices)
    assert out.dtype == torch.float32 and out.device == device  # logits always come back in fp32
    return out.cpu()


def fresh(model, num_blocks=256):
    p = next(model.parameters())
    return KVCache(model.cfg, num_blocks, BLOCK, p.dtype, p.device), BlockPool(num_blocks, BLOCK)


def test_full_prefill(models, variant, shape, dtype):
    ours, ref = models(variant, shape, dtype)
    ids = torch.randint(0, ours.cfg.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    kv, pool = fresh(ours)
    got = run(ours, kv, [Seq(pool).chunk(ids)], all_positions=True)
    ref.check(got, dtype, [(ids, slice(None))])


def test_chunked_prefill_uneven_pieces_then_decode(models, variant, shape, dtype):
    ours, ref = models(variant, shape, dtype)
    ids = torch.randint(0, ours.cfg.vocab_size, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    kv, pool = fresh(ours)
    seq, got, s = Seq(pool), [], 0
    for n in (7, 1, 13, 2, 19, 1, 1, 1, 15):  # uneven chunks, then token-by-token decode
        b_chunk = seq.chunk(ids[s : s + n])
        got.append(run(ours, kv, [b_chunk], all_positions=True))
        s += n
    assert s == len(ids)
    ref.check(torch.cat(got), dtype, [(ids, slice(None))])


def test_batched_decode_of_sequences_of_different_lengths(models, variant, shape, dtype):
    ours, ref = models(variant, shape, dtype)
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
        ref.check(torch.stack(got[i]), dtype, [(prompts[i] + tails[i], slice(len(prompts[i]) - 1, None))])


def test_chatglm_and_hf_layouts_give_identical_logits(make_checkpoint, device):
    ids = list(range(5, 40))
    outs = []
    for layout, style in (("hf", "4.x"), ("chatglm", "4.x"), ("hf", "5.x")):
        path = make_checkpoint("glm", layout, "wide", config_style=style)
        model = load_model(path, dtype=torch.float32, device=device)
        kv, pool = fresh(model)
        outs.append(run(model, kv, [Seq(pool).chunk(ids)], all_positions=True))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("variant", ["glm", "glm4"])
def test_greedy_generation_matches_transformers_generate(models, variant, device):
    ours, ref = models(variant, "wide")
    prompt = [11, 23, 5, 99, 42, 7, 64, 3]
    with torch.no_grad():
        expected = ref.model().generate(
            torch.tensor([prompt], device=device), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    kv, pool = fresh(ours)
    seq, nxt, got = Seq(pool), prompt, []
    for _ in range(32):
        tok = int(run(ours, kv, [seq.chunk(nxt)])[0].argmax())
        got.append(tok)
        nxt = [tok]
    assert got == expected


@pytest.mark.parametrize("variant", ["glm", "glm4"])
def test_long_context_chunked_prefill_then_decode(models, variant, dtype):
    ours, ref = models(variant, "small", dtype)
    n = 3000
    ids = torch.randint(0, ours.cfg.vocab_size, (n + 8,), generator=torch.Generator().manual_seed(4)).tolist()
    kv, pool = fresh(ours, num_blocks=(n + 8) // BLOCK + 2)
    seq, got, s = Seq(pool), [], 0
    for size in (1024, 1024, 952):  # chunked prefill, logits of each chunk's last token
        got.append(run(ours, kv, [seq.chunk(ids[s : s + size])])); s += size
    for t in range(8):  # decode at positions 3000..3007
        got.append(run(ours, kv, [seq.chunk([ids[s]])])); s += 1
    idx = [1023, 2047, 2999] + list(range(3000, 3008))
    ref.check(torch.cat(got), dtype, [(ids, idx)])


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(make_checkpoint, device, half):
    path = make_checkpoint("glm4", "hf", "small")
    ids = list(range(1, 50))
    out = {}
    for dt in (torch.float32, half):
        model = load_model(path, dtype=dt, device=device)
        assert next(model.parameters()).dtype == dt
        kv = KVCache(model.cfg, 64, BLOCK, dt, device)
        out[dt] = run(model, kv, [Seq(BlockPool(64, BLOCK)).chunk(ids)], all_positions=True)
    assert torch.isfinite(out[half]).all()
    assert (out[half] - out[torch.float32]).abs().max() < 0.05 * out[torch.float32].abs().max()



@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_yarn_rope_matches_transformers_past_the_trained_context(yarn_checkpoint, device, tolerances, style):
    """A 0414 checkpoint with YaRN in its config: ours and transformers' logits agree at every position of a
    prompt past twice the trained context, prefilled in chunks, and the served context is the stretched one."""
    path, plain_path = yarn_checkpoint(style)
    ours = load_model(path, dtype="float32", device=device)
    assert ours.cfg.yarn is not None and ours.cfg.max_position_embeddings == (4 if style == "4.x" else 3) * 64
    ids = torch.randint(0, ours.cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    kv, pool = fresh(ours)
    seq = Seq(pool)
    got = torch.cat([run(ours, kv, [seq.chunk(ids[s : s + 50])], all_positions=True) for s in (0, 50, 100)])
    Reference(path, device, tolerances).check(got, "float32", [(ids, slice(None))])
    # YaRN changes the logits: the same weights under plain RoPE differ
    plain = load_model(plain_path, dtype="float32", device=device)
    kv, pool = fresh(plain)
    assert not torch.allclose(run(plain, kv, [Seq(pool).chunk(ids)], all_positions=True), got, atol=1e-3)
