"""Ours against llama.cpp's llama-server on CPU: the same weights, single stream and concurrent streams.

The model is a slice of glm-4-9b-chat: its exact layer shapes (hidden 4096, FFN 13696, 32 heads over
2 KV groups of 128, vocabulary 151552), `--layers` of its 40 layers, random bf16 weights. The pairs:
ours bf16 vs llama.cpp BF16, ours int8 vs Q8_0, ours int4 vs Q4_0, ours fp32 vs F32. Both servers
run at once, each on the machine's cores, and their requests take turns (one server is idle while
the other works); with `--apart` (two copies of the model would not fit the memory) they run one after
the other instead, each alone. Prompts are the same token ids, decoding is greedy with the stop tokens
ignored.

llama.cpp comes from the llama-cpp-python source distribution on PyPI (its vendor/llama.cpp), built
once with cmake into ~/.cache/glm4serve/ (`llama-server`, `llama-quantize`); our checkpoint goes to
GGUF through its convert_hf_to_gguf.py, whose pre-tokenizer check does not know our small test
tokenizer and is told it is "glm4" (the tokenizer plays no part in the timing). Not part of CI.

    .venv/bin/python benchmarks/bench_cpu_peers.py [--layers 2] [--modes fp32,bf16,int8,int4] [--repeats 3]
        [--prefill-tokens 1024] [--decode-after-prefill] [--apart] [--ours-from-gguf]

With --ours-from-gguf our server is given llama.cpp's very file (`--model slice-Q4_0.gguf`), as a llama.cpp user
would start it, and serves its blocks as it does by default (each matrix in the nearest of int8 and int4). Mode
q4_k_m is llama-quantize's most downloaded mix, Q4_K_M, against ours from that file (--ours-from-gguf) or int4.

With `--isa avx2` both sides run the code of a CPU with AVX2 and not AVX-512 (most desktop and laptop CPUs) on
this one: llama.cpp built for AVX2 (its own folder), and our server with GLM4SERVE_MAX_CPU_ISA=avx2 and torch's,
oneDNN's and MKL's kernels held to AVX2 (AVX2_ENV). The memory and the cores stay this machine's.

Ratios are ours over theirs in speed: tokens/s ours / theirs, and prefill time theirs / ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_proc import ServerProcess, free_port, stop_process  # noqa: E402

from glm4serve.model.random_checkpoint import GLM4_9B_CHAT, write_random_checkpoint  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp is what gets built
BUILDS = {"native": "build-amx", "avx2": "build-avx2"}  # --isa -> llama.cpp's build folder
AVX2_ENV = {"GLM4SERVE_MAX_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CACHE = Path.home() / ".cache" / "glm4serve"
SLICE_9B = dict(GLM4_9B_CHAT, dtype="bfloat16")  # num_layers: --layers
# ours (--dtype, --quantization), llama.cpp's file type
MODES = {"fp32": ("float32", None, "F32"), "bf16": ("bfloat16", None, "BF16"), "int8": ("bfloat16", "int8", "Q8_0"),
         "int4": ("bfloat16", "int4", "Q4_0"), "q4_k_m": ("bfloat16", "int4", "Q4_K_M")}


def run(cmd: list[str], **kw) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def llama_cpp(isa: str = "native") -> Path:
    """llama.cpp's build folder for `isa`, with bin/llama-server and bin/llama-quantize built."""
    root = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    src = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    build = src / BUILDS[isa]
    if (build / "bin" / "llama-server").is_file() and (build / "bin" / "llama-quantize").is_file():
        return build
    root.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)])
        with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(root, filter="data")
    # Native: AVX-512 (VNNI, BF16) and, where the CPU has them, AMX tiles for Q8_0/Q4_0. At -O2: this
    # release's AMX matmul segfaults at the first forward when built with -O3 (CMAKE's Release), seen
    # on the project's Sapphire Rapids box; -O2 (RelWithDebInfo) runs it. For avx2: what a CPU without AVX-512 has.
    isa_flags = (["-DGGML_NATIVE=ON"] if isa == "native" else
                 ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                  "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"])
    run(["cmake", "-B", build.name, "-DCMAKE_BUILD_TYPE=RelWithDebInfo", *isa_flags, "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], cwd=src)
    run(["cmake", "--build", build.name, "--target", "llama-server", "llama-quantize", f"-j{os.cpu_count()}"], cwd=src)
    return build


CONVERT = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"  # our small tokenizer's hash is unknown to it
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def gguf_files(build: Path, checkpoint: Path, kinds: list[str]) -> dict[str, Path]:
    """The checkpoint converted to BF16 GGUF, then quantized to each other kind, cached beside it (the BF16 file
    is written only when a kind asked for is missing: 18.8 GB at 40 layers, that fill the page cache)."""
    bf16 = checkpoint / "slice-BF16.gguf"
    missing = [k for k in kinds if not (checkpoint / f"slice-{k}.gguf").is_file()]
    if missing and not bf16.is_file():
        src = build.parent
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        run([sys.executable, "-c", CONVERT, str(src), str(checkpoint), "--outtype", "bf16", "--outfile", str(bf16)],
            env=env)
    out = {"BF16": bf16}
    for kind in kinds:
        if kind != "BF16":
            out[kind] = checkpoint / f"slice-{kind}.gguf"
            if not out[kind].is_file():
                run([str(build / "bin" / "llama-quantize"), str(bf16), str(out[kind]), kind])
    return out


class LlamaServer:
    def __init__(self, build: Path, gguf: Path, slots: int, ctx_per_slot: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        threads = str(os.cpu_count())
        self.log = open(gguf.with_suffix(".server.log"), "w")
        self.proc = subprocess.Popen(
            [str(build / "bin" / "llama-server"), "-m", str(gguf), "--port", str(self.port), "-t", threads,
             "-tb", threads, "-np", str(slots), "-c", str(slots * ctx_per_slot), "--no-webui",
             # its converter reads the context from chatglm's `seq_length`, which a -hf config has not,
             # and writes 4,096 (the hidden size): the server would cap every slot there
             "--override-kv", f"chatglm.context_length=int:{SLICE_9B['max_position_embeddings']}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"llama-server not healthy, see {self.log.name}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def resident_gib(pid: int, field: str = "Rss") -> float:
    """A /proc/PID/smaps_rollup figure in GiB: Rss, or AnonHugePages (how much of it the kernel backs with huge
    pages; a step reads the weights ~10% slower when they lie in 4 KiB pages, README's "Huge pages")."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def stream(url: str, prompt: list[int], new_tokens: int) -> tuple[int, float, float]:
    """One streamed greedy completion: (tokens, decode tokens/s from the first event to the last,
    seconds to the first event: the prompt's prefill). The token count is the final chunk's usage:
    events may carry no text (a token without any, or held back mid-character), and llama-server's
    random-weight argmax is often a padding token."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
                tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
    assert tokens == new_tokens, f"{url}: {tokens} tokens"
    return tokens, (tokens - 1) / (times[-1] - times[0]), times[0] - t0


def prefill(url: str, prompt: list[int]) -> float:
    """Seconds for one completion of a single token: the prompt's prefill, its first token sampled."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    httpx.post(url + "/v1/completions", json=body, timeout=900).raise_for_status()
    return time.perf_counter() - t0


def prefill_prompts(n: int, count: int) -> list[list[int]]:
    """`count` prompts of `n` token ids that differ from their first token on, so that neither server's
    prompt cache holds any block of the next one (ids under the small test tokenizer's 2,270)."""
    period = min(n, 2048)
    return [[100 + (i + 13 * k) % period for i in range(n)] for k in range(1, count + 1)]


def concurrent(url: str, prompts: list[list[int]], new_tokens: int) -> float:
    """Aggregate tokens/s of all the prompts streamed at once."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda p: stream(url, p, new_tokens)[0], prompts))
    return sum(got) / (time.perf_counter() - t0)


def measure(urls: dict[str, str], a, mode: str, prompt: list[int], many: list[list[int]]) -> dict[str, dict]:
    """Each server's figures ({who: {"stream": tokens/s of each turn, "prefill": seconds, ...}}), the servers
    taking turns request by request: one is idle while the other works."""
    f: dict[str, dict] = {who: {"stream": [], "prefill": [], "long_decode": []} for who in urls}
    for url in urls.values():  # warm-up
        stream(url, prompt, 8)
    for _ in range(a.repeats):
        for who, url in urls.items():
            f[who]["stream"].append(stream(url, prompt, a.new_tokens)[1])
    if a.prefill_tokens:
        for p in prefill_prompts(a.prefill_tokens, a.repeats):  # each prompt new to every server
            for who, url in urls.items():
                if a.decode_after_prefill:
                    _, rate, first_s = stream(url, p, a.new_tokens)
                    f[who]["prefill"].append(first_s)
                    f[who]["long_decode"].append(rate)
                else:
                    f[who]["prefill"].append(prefill(url, p))
    if mode in a.concurrent_modes.split(","):
        for who, url in urls.items():
            f[who]["concurrent"] = concurrent(url, many, a.new_tokens)
    return f


def summary(f: dict[str, dict], r: dict, mode: str, kind: str, a) -> str:
    """One line of the two servers' figures and their ratios; the medians go into r as well."""
    ours, theirs = f["ours"], f["llama.cpp"]

    def runs(xs, fmt=".1f"):
        return " / ".join(f"{x:{fmt}}" for x in xs)

    r.update(ours=statistics.median(ours["stream"]), ours_runs=ours["stream"],
             **{"llama.cpp": statistics.median(theirs["stream"]), "llama.cpp_runs": theirs["stream"]},
             ours_rss_gib=ours["rss_gib"], ours_hugepages_gib=ours["hugepages_gib"], llama_rss_gib=theirs["rss_gib"])
    line = (f"{mode} vs {kind}{' (apart)' if a.apart else ''}: single stream ours {r['ours']:.1f} tok/s (runs "
            f"{runs(ours['stream'])}), llama.cpp {r['llama.cpp']:.1f} tok/s (runs {runs(theirs['stream'])}), "
            f"ratio {r['ours'] / r['llama.cpp']:.2f}x; resident ours {r['ours_rss_gib']:.2f} GiB "
            f"({r['ours_hugepages_gib']:.2f} in huge pages), llama.cpp {r['llama_rss_gib']:.2f} GiB")
    def pair(label: str, kind: str, keys: tuple[str, str], unit: str, fmt: str, lower_is_faster: bool) -> str:
        o, t = statistics.median(ours[kind]), statistics.median(theirs[kind])
        r[keys[0]], r[keys[1]] = o, t
        return (f"; {label} ours {o:{fmt}} {unit} (runs {runs(ours[kind], fmt)}), llama.cpp {t:{fmt}} {unit} "
                f"(runs {runs(theirs[kind], fmt)}), ratio {(t / o if lower_is_faster else o / t):.2f}x")

    if a.prefill_tokens:
        line += pair(f"prefill of {a.prefill_tokens} tokens", "prefill", ("ours_prefill_s", "llama_prefill_s"), "s",
                     ".2f", True)
    if a.decode_after_prefill:
        line += pair("decode after it", "long_decode", ("ours_long_decode", "llama_long_decode"), "tok/s", ".1f",
                     False)
    if "concurrent" in ours:
        r["ours_concurrent"], r["llama_concurrent"] = ours["concurrent"], theirs["concurrent"]
        line += (f"; {a.concurrent} streams ours {r['ours_concurrent']:.1f} tok/s, llama.cpp "
                 f"{r['llama_concurrent']:.1f} tok/s, ratio {r['ours_concurrent'] / r['llama_concurrent']:.2f}x")
    return line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--modes", default="bf16,int8,int4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--concurrent-modes", default="int8", help="modes that also run --concurrent streams")
    ap.add_argument("--prefill-tokens", type=int, default=1024, help="prompt length of the prefill turns (0: none)")
    ap.add_argument("--decode-after-prefill", action="store_true",
                    help="the prefill turns stream --new-tokens tokens: also the decode rate at that context")
    ap.add_argument("--apart", action="store_true",
                    help="run the servers one after the other, each alone in memory (for a model two copies of which "
                         "do not fit): their turns are then minutes apart, not interleaved")
    ap.add_argument("--isa", choices=sorted(BUILDS), default="native",
                    help="avx2: both servers in the code of a CPU without AVX-512 (module docstring)")
    ap.add_argument("--ours-from-gguf", action="store_true",
                    help="our server loads llama.cpp's GGUF file too (served as by default: each matrix in the "
                         "nearest of int8 and int4), not the safetensors checkpoint")
    a = ap.parse_args()
    modes = a.modes.split(",")
    build = llama_cpp(a.isa)
    checkpoint = CACHE / f"bench-slice-9b-{a.layers}layers"
    if not (checkpoint / "config.json").is_file():
        write_random_checkpoint(checkpoint, **{**SLICE_9B, "num_layers": a.layers})
    ggufs = gguf_files(build, checkpoint, [MODES[m][2] for m in modes])
    prompt = list(range(100, 132))
    many = [list(range(200 + i, 232 + i)) for i in range(a.concurrent)]
    results = {}
    for mode in modes:
        dtype, quantization, kind = MODES[mode]
        args = ["--max-num-seqs", str(a.concurrent), "--served-model-name", "bench"]
        if quantization and not a.ours_from_gguf:  # from the file: its block types pick ours (the server's default)
            args += ["--quantization", quantization]
        ours_model = ggufs[kind] if a.ours_from_gguf else checkpoint
        r: dict = {}

        def start_ours():
            t0 = time.perf_counter()
            server = ServerProcess(ours_model, *args, dtype=dtype, kv_cache_memory="2GiB",
                                   env=AVX2_ENV if a.isa == "avx2" else None).wait_healthy(timeout=900)
            r["ours_load_s"] = time.perf_counter() - t0
            print(f"ours: healthy {r['ours_load_s']:.1f} s after the start, from {ours_model}", flush=True)
            return server

        def start_theirs():
            return LlamaServer(build, ggufs[kind], slots=a.concurrent,
                               ctx_per_slot=max(512, a.prefill_tokens + a.new_tokens + 16))

        runs = [[("ours", start_ours), ("llama.cpp", start_theirs)]]
        if a.apart:
            runs = [[pair] for pair in runs[0]]
        figures = {}
        for run_ in runs:
            servers = {}
            try:
                for who, start in run_:
                    servers[who] = start()
                figures.update(measure({who: s.url for who, s in servers.items()}, a, mode, prompt, many))
                for who, s in servers.items():
                    figures[who]["rss_gib"] = resident_gib(s.proc.pid)
                    figures[who]["hugepages_gib"] = resident_gib(s.proc.pid, "AnonHugePages")
            finally:
                for who, s in servers.items():
                    try:
                        s.stop()
                    except Exception as e:  # noqa: BLE001 - the other one is stopped all the same
                        print(f"stopping {who} failed: {e!r}", file=sys.stderr)
        print(summary(figures, r, mode, kind, a), flush=True)
        results[mode] = r
    print(json.dumps(results))


if __name__ == "__main__":
    main()
