"""GGUF files (llama.cpp's format) served as checkpoints: config, tokenizer and weights (gguf_file.py, loader.py).

The files are written by tests/gguf_files.py the way llama.cpp's converter writes GLM-4, from the random
safetensors checkpoints, so each test compares what the GGUF file gives with what its source folder gives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from glm4serve.engine.config import EngineArgs
from glm4serve.engine.types import SamplingParams
from glm4serve.model.config import ConfigError, ModelConfig
from glm4serve.model.gguf_blocks import BLOCK_TYPES, INT4_CODES, int4_codes, widen
from glm4serve.model.gguf_file import GGUFError, open_gguf, quantized_types
from glm4serve.model.glm4 import load_model
from glm4serve.model.loader import CheckpointError
from glm4serve.model.shard import Shard
from glm4serve.model.tokenizer import Tokenizer
from glm4serve.server import build_llm_engine, weight_quantization

from gguf_files import dequantized, iq4_nl_blocks, write_gguf
from server_proc import ServerProcess
from test_quant import assert_int4_fits

SOURCES = {"glm-hf": ("glm", "hf"), "glm-chatglm": ("glm", "chatglm"), "glm4-hf": ("glm4", "hf")}
TEXTS = ["Hello world! 你好，世界 1234567\n\n  tabs\tand émojis 🦙", "<|user|>\nhi<|assistant|> [gMASK]<sop>",
         "def f(x):\n    return x ** 2  # 'quoted' \"and\" ..."]


@pytest.fixture(scope="module")
def gguf_of(make_checkpoint, tmp_path_factory):
    """gguf_of(source, matrix_type="F32", dtype="float32") -> (the source folder, the GGUF file made of it)."""
    cache = {}

    def make(source: str, matrix_type: str = "F32", dtype: str = "float32", **kw):
        key = (source, matrix_type, dtype, repr(sorted(kw.items())))
        if key not in cache:
            src = make_checkpoint(*SOURCES[source], dtype=dtype)
            out = tmp_path_factory.mktemp("gguf") / f"{source}-{matrix_type}.gguf"
            cache[key] = src, write_gguf(src, out, matrix_type, **kw)
        return cache[key]

    return make


def _fields(cfg: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("layout", "extra", "eos_token_ids", "pad_token_id", "torch_dtype", "rms_norm_eps")}


@pytest.mark.parametrize("source", SOURCES)
def test_the_config_is_the_source_folders(gguf_of, source):
    src, f = gguf_of(source)
    ours, theirs = ModelConfig.from_dir(f), ModelConfig.from_dir(src)
    assert ours.layout == "gguf" and _fields(ours) == _fields(theirs)
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-7)  # GGUF keeps a float32


@pytest.mark.parametrize("source", SOURCES)
def test_float_weights_load_bit_for_bit(gguf_of, source):
    """F32 files (q, k, v apart from an HF source, attn_qkv whole from a chatglm one), and BF16 read as bf16."""
    for matrix_type, dtype in (("F32", "float32"), ("BF16", "bfloat16")):
        src, f = gguf_of(source, matrix_type, dtype)
        ours = load_model(f, dtype=dtype).state_dict()
        theirs = load_model(src, dtype=dtype).state_dict()
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_block_types_load_as_llama_cpps_dequantization_of_them(gguf_of, kind):
    """--quantization none: every matrix widened exactly (the embedding and output layer too), vectors as stored."""
    src, f = gguf_of("glm-hf", kind)
    ours = load_model(f, dtype="float32").state_dict()
    theirs = load_model(src, dtype="float32").state_dict()
    for name, x in theirs.items():
        want = dequantized(x, kind) if x.dim() == 2 else x
        assert torch.equal(ours[name], want), name
        if x.dim() == 2:
            assert not torch.equal(ours[name], x)  # the file's blocks, not the source's floats


@pytest.mark.parametrize("kind, nearest", [("Q8_0", "int8"), ("Q5_0", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4"),
                                           ("F32", None), ("BF16", None), ("F16", None)])
def test_the_quantization_a_file_gets_by_default(gguf_of, make_checkpoint, kind, nearest, caplog):
    src, f = gguf_of("glm-hf", kind)
    assert quantized_types(open_gguf(f)) == ({kind: nearest} if nearest else {})
    with caplog.at_level(logging.INFO, logger="glm4serve"):
        assert weight_quantization(None, f, "cpu") == ("gguf" if nearest else None)
    kept = kind in ("Q4_0", "Q4_1")  # int4 groups of 32 as they stand
    assert (f"{kind} matrices, block types glm4serve has no kernels for: re-quantized at load to {nearest}"
            in caplog.text) == (nearest is not None and not kept)
    assert (f"{kind} matrices: served as int4 groups of 32 holding their 4-bit codes" in caplog.text) == kept
    assert weight_quantization("none", f, "cpu") is None and weight_quantization("int4", f, "cpu") == "int4"
    assert weight_quantization(None, f, "cuda") is None  # widened to the model's dtype on a GPU
    assert weight_quantization(None, src, "cpu") is None and weight_quantization("none", src, "cpu") is None
    if nearest:
        model = load_model(f, dtype="float32", quantization="gguf")
        linears = [m for m in model.modules() if hasattr(m, "in_features")]
        assert {type(m).__name__ for m in linears} == {f"Int{nearest[3]}Linear"}


# llama-quantize's Q4_K_M, as it writes glm-4-9b-chat: Q4_K, with more bits for v in some layers, for ffn_down
# (whose 13696 inputs are no multiple of Q4_K's 256: Q5_0, or Q8_0 where it keeps more) and the output layer.
# gguf-py writes no K-quants: Q4_0 and Q5_0 stand in for Q4_K and Q6_K, the same sides of 5 bits a weight.
K_MIX = {"blk.1.attn_v.weight": "Q5_0", "blk.0.ffn_down.weight": "Q5_0", "blk.1.ffn_down.weight": "Q8_0",
         "output.weight": "Q8_0"}


@pytest.mark.parametrize("source", ["glm-hf", "glm-chatglm"])
def test_a_mixed_file_serves_each_matrix_in_the_nearest_of_ours(gguf_of, source):
    """The default for a file of several block types ("gguf"): each linear int4 or int8 by its own tensors' type,
    v's wider type making its layer's fused qkv int8; the 4-bit ones hold the file's codes, the others are the
    widened weights within int8's rounding. The output layer is the file's own too, where one type for all
    would re-quantize it (and the wider ffn_down) to 4 bits."""
    from glm4serve.model.quant import Int4Linear, Int8Linear

    _, f = gguf_of(source, "Q4_0", types=K_MIX)
    model = load_model(f, dtype="float32", quantization="gguf")
    widened = load_model(f, dtype="float32").state_dict()
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    split = source == "glm-hf"  # a chatglm file's attn_qkv is one tensor, of the whole file's type
    assert kinds == {"layers.0.attn.qkv": Int4Linear, "layers.1.attn.qkv": Int8Linear if split else Int4Linear,
                     "layers.0.attn.o": Int4Linear, "layers.1.attn.o": Int4Linear,
                     "layers.0.mlp.gate_up": Int4Linear, "layers.1.mlp.gate_up": Int4Linear,
                     "layers.0.mlp.down": Int8Linear, "layers.1.mlp.down": Int8Linear, "lm_head": Int8Linear}
    for name, lin in ((n, m) for n, m in model.named_modules() if n in kinds):
        want = widened[name + ".weight"]
        if isinstance(lin, Int4Linear):
            assert lin.group == 32
            scale, zero = lin.scales_by_row().float().permute(2, 1, 0)  # [out, in / 32] each
            bound = (2**-8 * (8 * scale.abs() + zero.abs())).repeat_interleave(32, dim=1)
        else:  # half a step of the row's scale, that scale rounded to bf16 (2^-8 of it, 127 steps)
            bound = (lin.scale.float() * (0.5 + 127 * 2**-8))[:, None].expand_as(want)
        assert ((lin.dequantized() - want).abs() <= bound).all(), name
    one_type = load_model(f, dtype="float32", quantization="int4")
    assert all(isinstance(m, Int4Linear) for n, m in one_type.named_modules() if n in kinds)
    rank = load_model(f, dtype="float32", quantization="gguf", shard=Shard(1, 2))  # a tensor-parallel rank's
    assert {n: type(m) for n, m in rank.named_modules() if n in kinds} == kinds
    with pytest.raises(ValueError, match="'gguf' .* is for GGUF files"):
        load_model(gguf_of(source)[0], quantization="gguf")


def test_a_mixed_file_serves_through_the_engine_as_its_widened_weights(gguf_of):
    """The server's default for a mixed file on CPU, through the engine: the greedy tokens of its widened weights."""
    _, f = gguf_of("glm-hf", "Q4_0", types=K_MIX)
    prompt = list(range(30, 70))

    def greedy(quantization):
        engine = build_llm_engine(EngineArgs(model=str(f), dtype="bfloat16", quantization=quantization, device="cpu",
                                             kv_cache_memory=8 << 20))
        engine.add_request("r", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        ids = []
        while engine.has_work:
            ids += [t for o in engine.step() for t in o.token_ids]
        return ids

    assert greedy(None) == greedy("none") and len(greedy(None)) == 24


def test_a_type_without_torch_widening_goes_through_ggufs_own_code_and_is_re_quantized(gguf_of, monkeypatch):
    """IQ4_NL (like the i-quants, Q2_K and Q3_K) is widened by gguf's numpy code, a few rows at a time, and its
    uneven levels re-quantized to int4 in groups of 64 by default."""
    from gguf import GGMLQuantizationType, quants

    from glm4serve.model import loader
    from glm4serve.model.quant import Int4Linear

    src, f = gguf_of("glm-hf", "IQ4_NL")
    assert quantized_types(open_gguf(f)) == {"IQ4_NL": "int4"} and weight_quantization(None, f, "cpu") == "gguf"
    monkeypatch.setattr(loader, "READ_BYTES", 24 * 4 * 64)
    widened = load_model(f, dtype="float32").state_dict()
    model = load_model(f, dtype="float32", quantization="gguf")
    source = load_model(src, dtype="float32").state_dict()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(linears) == 2 * 4 + 1 and {m.group for m in linears.values()} == {64}
    for name, lin in linears.items():
        x = source[name + ".weight"].numpy()
        want = torch.from_numpy(quants.dequantize(iq4_nl_blocks(x), GGMLQuantizationType.IQ4_NL))
        assert torch.equal(widened[name + ".weight"], want), name
        assert_int4_fits(lin, want, name)  # as int4 is fitted to any weights
        assert not torch.equal(lin.dequantized(), want)  # re-quantized: not the file's levels


@pytest.mark.parametrize("source", SOURCES)
def test_the_tokenizer_is_the_source_folders(gguf_of, source):
    src, f = gguf_of(source)
    ours, theirs = Tokenizer.from_dir(f), Tokenizer.from_dir(src)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.encode(text, allow_special=False) == theirs.encode(text, allow_special=False)
    assert [ours.token_bytes(i) for i in range(theirs.vocab_size)] == [
        theirs.token_bytes(i) for i in range(theirs.vocab_size)]
    assert ours.special_tokens == theirs.special_tokens
    assert ours.stop_token_ids == theirs.stop_token_ids and len(ours.stop_token_ids) == 3
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == theirs.vocab_size  # the [PAD] rows past the last token are no token ids


def test_the_chat_template_comes_from_the_file(make_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint(), src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    f = write_gguf(src, tmp_path / "m.gguf")
    assert Tokenizer.from_dir(f).chat_template == (src / "chat_template.jinja").read_text()


def test_greedy_tokens_are_the_source_folders(gguf_of):
    """Through the engine: an F32 file decodes as its folder does (rms eps a float32 apart)."""
    src, f = gguf_of("glm-hf")
    prompt = list(range(30, 70))

    def greedy(path):
        engine = build_llm_engine(EngineArgs(model=str(path), dtype="float32", kv_cache_memory=8 << 20))
        engine.add_request("r", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        ids = []
        while engine.has_work:
            ids += [t for o in engine.step() for t in o.token_ids]
        return ids

    assert greedy(f) == greedy(src) and len(greedy(f)) == 24


def test_hf_overrides_apply_to_a_gguf_config(gguf_of):
    _, f = gguf_of("glm-hf")
    assert ModelConfig.from_dir(f, {"rope_theta": 1234.0}).rope_theta == 1234.0


def test_yarn_in_the_metadata_is_read_and_other_scalings_refused(make_checkpoint, tmp_path):
    src = make_checkpoint("glm4", "hf")
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = ModelConfig.from_dir(write_gguf(src, tmp_path / "yarn.gguf", rope_scaling=yarn))
    assert cfg.yarn is not None and (cfg.yarn.factor, cfg.yarn.original_max_positions) == (4.0, 64)
    assert cfg.max_position_embeddings == 256
    linear = write_gguf(src, tmp_path / "linear.gguf", rope_scaling={**yarn, "type": "linear"})
    with pytest.raises(ConfigError, match="linear"):
        ModelConfig.from_dir(linear)


def test_files_that_are_not_glm4_gguf_are_refused_by_name(gguf_of, tmp_path):
    src, f = gguf_of("glm-hf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(GGUFError, match="truncated or not a GGUF file"):
        ModelConfig.from_dir(cut)
    import gguf

    other = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    other.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    other.write_header_to_file(), other.write_kv_data_to_file(), other.write_tensors_to_file(), other.close()
    with pytest.raises(GGUFError, match="architecture 'llama' is not GLM-4's"):
        ModelConfig.from_dir(tmp_path / "llama.gguf")


def test_a_missing_or_misshapen_tensor_is_named(gguf_of, tmp_path):
    src, _ = gguf_of("glm-hf")
    part = tmp_path / "part"
    shutil.copytree(src, part)
    from safetensors.torch import load_file, save_file

    tensors = load_file(part / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, part / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor blk\.1\.ffn_down\.weight"):
        load_model(write_gguf(part, tmp_path / "part.gguf"), dtype="float32")


def test_a_tokenizer_of_another_pre_tokenizer_is_refused(make_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(make_checkpoint(), src)
    config = json.loads((src / "config.json").read_text())
    f = write_gguf(src, tmp_path / "m.gguf")
    import gguf

    reader = gguf.GGUFReader(f)
    assert reader.get_field("tokenizer.ggml.pre").contents() == "chatglm-bpe" and config["model_type"] == "glm"
    data = bytearray(f.read_bytes())
    at = data.index(b"chatglm-bpe")
    data[at:at + 11] = b"qwen2-bpe!!"  # same length: the file stays well formed
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="pre-tokenizer 'qwen2-bpe!!'"):
        Tokenizer.from_dir(bad)


def test_a_server_serves_a_q8_0_file_as_int8_and_frees_its_blocks(gguf_of, device):
    """glm4serve serve --model file.gguf: the chat API through the SDK, the file's block types re-quantized to int8
    (logged), the model listed under its served name."""
    if device != "cpu":
        pytest.skip("int8 runs on CPU")
    _, f = gguf_of("glm-hf", "Q8_0")
    s = ServerProcess(f, "--served-model-name", "glm4-gguf").wait_healthy()
    try:
        from test_e2e_server import MSGS, client, wait_idle

        kw = dict(model="glm4-gguf", messages=MSGS, max_tokens=20, temperature=0)
        whole = client(s).chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client(s).chat.completions.create(
            **kw, stream=True) if c.choices)
        assert whole and streamed == whole
        assert [m.id for m in client(s).models.list().data] == ["glm4-gguf"]
        wait_idle(s)
    finally:
        s.stop()
    log = s.log_path.read_text()
    assert "Q8_0 x" in log and "re-quantized at load to int8" in log


def test_a_directory_path_that_is_not_gguf_is_still_a_folder(make_checkpoint):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(make_checkpoint().parent)


def test_glm_4_9b_chats_own_vocabulary_tokenizes_as_its_tokenizer_model(real_chat_dir, tmp_path):
    """The real vocabulary as llama.cpp's converter writes it (151,329 BPE tokens, some no pair of merges reaches)
    against our tiktoken reading of tokenizer.model: the same ids for text of many scripts, the same bytes."""
    from gguf_files import write_tiktoken_vocab_gguf

    ours = Tokenizer.from_gguf(write_tiktoken_vocab_gguf(real_chat_dir, tmp_path / "vocab.gguf"))
    theirs = Tokenizer.from_dir(real_chat_dir)
    texts = TEXTS + ["Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم. こんにちは世界。안녕하세요 세계",
                     "   leading spaces, trailing   \n\n\n\t\r\n" + "0123456789" * 5 + " ¡¿‽ ⅷ ﬁ ½",
                     "<|system|>\nYou are GLM-4.<|user|>\n写一首关于秋天的诗<|assistant|>\n<|observation|>"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, allow_special=False) == theirs.encode(text, allow_special=False), text
    assert ours.vocab_size == theirs.vocab_size
    assert all(ours.token_bytes(i) == theirs.token_bytes(i) for i in range(theirs.vocab_size))
    assert ours.stop_token_ids == theirs.stop_token_ids


def test_a_context_of_the_hidden_size_warns_of_the_converters_slip_and_the_override_mends_it(make_checkpoint,
                                                                                            tmp_path, caplog):
    """llama.cpp's converter writes glm-4-9b-chat-hf's hidden size as the context (it looks for seq_length)."""
    src = make_checkpoint("glm", "hf", max_position_embeddings=64)  # the "small" shape's hidden size
    f = write_gguf(src, tmp_path / "hf.gguf")
    with caplog.at_level(logging.WARNING, logger="glm4serve"):
        assert ModelConfig.from_dir(f).max_position_embeddings == 64
    fix = json.loads(caplog.text.split("--hf-overrides '")[1].split("'")[0])
    assert fix == {"max_position_embeddings": 131072, "rope_theta": 5e6, "rms_norm_eps": 1.5625e-07}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glm4serve"):
        mended = ModelConfig.from_dir(f, fix)
    assert (mended.max_position_embeddings, mended.rope_theta, mended.rms_norm_eps) == (131072, 5e6, 1.5625e-07)
    assert "converter" not in caplog.text  # the user has set the context: nothing to warn of
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glm4serve"):
        ModelConfig.from_dir(write_gguf(make_checkpoint("glm", "hf"), tmp_path / "128k.gguf"))
    assert "converter" not in caplog.text


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_block_types_widen_as_ggufs_numpy_code_bit_for_bit(kind):
    """Random bytes (any scale, nan and inf among them) for each block type widened in torch (gguf_blocks.py) give
    gguf's numpy dequantization, the reference of llama.cpp's formulas in Python, bit for bit."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    weights, size, _ = BLOCK_TYPES[kind]
    data = np.random.default_rng(0).integers(0, 256, size=(48, 4 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType[kind]))
    got = widen(torch.from_numpy(data.copy()), kind)
    assert got.shape == want.shape == (48, 4 * weights)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()  # which nan (its sign) is the CPU's
    same = ~want.isnan()
    assert torch.equal(got[same].view(torch.int32), want[same].view(torch.int32))  # -0.0 and inf too


@pytest.mark.parametrize("source", ["glm-hf", "glm-chatglm"])
def test_each_rank_reads_its_cut_of_a_gguf_file(gguf_of, source):
    """Tensor parallelism over a GGUF file: each rank's parts are those of the whole model read from it."""
    _, f = gguf_of(source, "Q8_0")
    whole = dict(load_model(f, dtype=torch.float32).named_parameters())
    for rank in range(2):
        shard = Shard(rank, 2)
        for name, p in load_model(f, dtype=torch.float32, shard=shard).named_parameters():
            cut = shard.cut(name, ModelConfig.from_dir(f))
            want = whole[name] if cut is None else torch.cat(
                [whole[name].narrow(cut[0], a, b - a) for a, b in cut[1]], dim=cut[0])
            assert torch.equal(p, want), name


def test_reading_a_few_rows_at_a_time_gives_the_whole_read(gguf_of, monkeypatch):
    """int4 quantized from rows read 24 at a time (tiles of 64 rows filled across reads) is the same model."""
    from glm4serve.model import loader

    _, f = gguf_of("glm-hf", "Q4_0")
    whole = load_model(f, dtype=torch.float32, quantization="int4").state_dict()
    monkeypatch.setattr(loader, "READ_BYTES", 24 * 4 * 64)  # 24 rows of the 64 inputs of most matrices
    pieces = load_model(f, dtype=torch.float32, quantization="int4").state_dict()
    assert whole.keys() == pieces.keys()
    assert all(torch.equal(whole[k], pieces[k]) for k in whole)


@pytest.mark.parametrize("kind", sorted(INT4_CODES))
def test_4_bit_blocks_as_int4_codes_are_the_widened_weights(kind):
    """Q4_0, Q4_1 and Q4_K blocks (random codes, sane scales) as codes, scales and zeros of groups of 32 give the
    widened weights exactly: the file's 4-bit model is one of our int4 models."""
    import numpy as np

    size, _ = INT4_CODES[kind]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(64, size), dtype=np.uint8)
    halves = np.frombuffer(rng.uniform(-0.1, 0.1, 2 * 64).astype(np.float16).tobytes(), np.uint8).reshape(64, 4)
    blocks[:, :4 if kind != "Q4_0" else 2] = halves[:, :4 if kind != "Q4_0" else 2]  # d (and m or dmin)
    rows = torch.from_numpy(blocks.reshape(16, -1).copy())
    q, scale, zero = int4_codes(rows, kind)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (16, q.shape[1] // 32)
    got = (q.float() - 8).view(16, -1, 32) * scale[..., None] + zero[..., None]
    assert torch.equal(got.view(16, -1), widen(rows, kind))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_a_4_bit_file_served_as_int4_keeps_its_codes(gguf_of, kind):
    """The default for a Q4_0 or Q4_1 file: int4 groups of 32 holding the file's codes, so every weight is the
    file's but for the bf16 of its group's scale and zero (2^-9 relative); int4 made from the floats would not be."""
    from glm4serve.model.quant import Int4Linear

    src, f = gguf_of("glm-hf", kind)
    model = load_model(f, dtype="float32", quantization="int4")
    widened = load_model(f, dtype="float32").state_dict()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(linears) == 2 * 4 + 1 and all(m.group == 32 for m in linears.values())
    for name, lin in linears.items():
        want = widened[name + ".weight"]
        scale, zero = lin.scales_by_row().float().permute(2, 1, 0)  # [out, in / 32] each
        bound = (2**-8 * (8 * scale.abs() + zero.abs())).repeat_interleave(32, dim=1)
        assert ((lin.dequantized() - want).abs() <= bound).all(), name
    from_floats = load_model(src, dtype="float32", quantization="int4")  # groups of 64, made from the weights
    assert next(m for m in from_floats.modules() if isinstance(m, Int4Linear)).group == 64


def test_a_file_of_other_block_types_is_re_quantized_in_groups_of_64(gguf_of):
    from glm4serve.model.quant import Int4Linear

    _, f = gguf_of("glm-hf", "Q5_0")
    model = load_model(f, dtype="float32", quantization="int4")
    assert {m.group for m in model.modules() if isinstance(m, Int4Linear)} == {64}


@pytest.mark.parametrize("rows", [1, 3, 8, 56, 160])
def test_negative_scales_of_q4_0_blocks_run_in_every_kernel(gguf_of, rows):
    """Q4_0's scale is the block's extreme over -8, so half its blocks have a negative one, kept as it is: every
    kernel path (one row, the batch kernels, prefill tiles) gives the product with the dequantized weights."""
    from glm4serve.model.quant import Int4Linear

    _, f = gguf_of("glm-hf", "Q4_0")
    model = load_model(f, dtype="bfloat16", quantization="int4")
    g = torch.Generator().manual_seed(rows)
    for name, lin in ((n, m) for n, m in model.named_modules() if isinstance(m, Int4Linear)):
        assert (lin.scales_by_row()[..., 0] < 0).any(), name
        x = torch.randn(rows, lin.in_features, generator=g).bfloat16()
        want = x.float() @ lin.dequantized().float().T
        got = lin(x).float() - (0 if lin.bias is None else lin.bias.float())
        assert (got - want).abs().max() <= 2e-2 * want.abs().max(), (name, rows)
