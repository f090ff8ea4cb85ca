#!/usr/bin/env bash
# The GPU check (issues 13 and 15) on a bare lent GPU machine, from the repository root, in two parts of
# under 10 minutes each (a device command's limit; inductor compiles the runner's layers for each model
# the tests and the benchmark load, which the first check, before that compile, did not wait for):
#   bench: the GPU figures (benchmarks/bench_gpu.py, <= 6 min) -> $OUT/bench_gpu.json, bench_gpu.log,
#          and them against issue 15's targets (benchmarks/gpu_summary.py) -> $OUT/summary.md; then, in
#          what is left of the part's 370 s, the batch-1 kernels' tests -> $OUT/pytest_kernels.xml, .log
#   tests: the model, engine and end-to-end tests on the GPU (`pytest --device cuda`, <= 7.5 min; the
#          issue's equivalence, runner, engine and server tests first, should the time run out; the
#          kernels' tests last, unless the bench part ran them through) -> $OUT/pytest.xml, pytest.log
# Both write $OUT/gpu.txt; no argument runs both, one after the other.
#
# The machine's python3 (3.12) brings torch with CUDA, transformers, tokenizers, tiktoken, safetensors,
# huggingface-hub, jinja2, pyyaml, tqdm, prometheus-client, httpx, pytest, uvloop, click, attrs and
# annotated-doc. The rest of what the server and the tests import travels as cp312 wheels in .whl/
# (ignored by git), fetched here once:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
#     python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
#     opentelemetry-api==1.45.2 uvicorn==0.54.0 sse-starlette==3.7.0 anyio==4.16.0 idna==3.20 h11==0.16.0 \
#     openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1 \
#     jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
#     xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
#
# (the versions of .venv; xgrammar for the structured-output tests). Then, through
# the device tool, at once and one after the other (the second finds the machine warm):
#   run(command="bash scripts/gpu_check.sh bench", carry=[".whl"], timeout_s=380)
#   run(command="bash scripts/gpu_check.sh tests", carry=[".whl"], timeout_s=460)
# (with the machine's start, ~14 of a session's 15 minutes of device time)
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
case "$part" in bench|tests|all) ;; *) echo "usage: $0 [bench|tests]"; exit 2 ;; esac
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

FIRST_TESTS="tests/test_model_equivalence.py tests/test_paged_decode.py tests/test_engine_with_model.py
    tests/test_e2e_server.py tests/test_prefix_cache_model.py tests/test_long_context.py tests/test_sampler.py"
KERNEL_TESTS="tests/test_gemv.py tests/test_one_row.py"
KERNELS_RAN=/tmp/glm4serve-kernel-tests-ran  # survives between the two calls while the machine stays warm

gpu_pytest() {  # limit_s xml_name files...: at the limit pytest gets an interrupt (SIGINT), reports what
    local limit=$1 name=$2; shift 2  # ran and writes its XML; exit 0 or 1 means every test ran
    timeout -s INT -k 20 "$limit" python3 -m pytest -q -rfE --durations=15 -p no:cacheprovider --device cuda \
        --junitxml "$OUT/$name.xml" "$@" 2>&1 | tee "$OUT/$name.log"
}

bench=0 kernels=0 tests=0
if [ "$part" = bench ] || [ "$part" = all ]; then
    rm -f "$KERNELS_RAN"
    timeout -k 10 360 python3 benchmarks/bench_gpu.py --budget-s 320 --out "$OUT/bench_gpu.json" 2>&1 \
        | tee "$OUT/bench_gpu.log"
    bench=$?
    [ -f "$OUT/bench_gpu.json" ] && python3 benchmarks/gpu_summary.py "$OUT/bench_gpu.json" | tee "$OUT/summary.md"
    left=$((370 - SECONDS))
    if [ "$left" -ge 60 ]; then
        gpu_pytest $((left - 25)) pytest_kernels $KERNEL_TESTS
        kernels=$?
        [ "$kernels" -le 1 ] && touch "$KERNELS_RAN"
    else
        echo "bench part: ${left}s left, the kernels' tests wait for the tests part"
    fi
fi
if [ "$part" = tests ] || [ "$part" = all ]; then
    if [ -f "$KERNELS_RAN" ]; then gpu_pytest 440 pytest $FIRST_TESTS
    else gpu_pytest 440 pytest $FIRST_TESTS $KERNEL_TESTS; fi
    tests=$?
fi
echo "$part: bench_gpu exit $bench, kernels' pytest exit $kernels, pytest exit $tests"
exit $((tests || kernels || bench))
