#!/usr/bin/env bash
# gpu_check.sh's tests and benchmark on this CPU, under the GPU image's versions (KINDS.md in the
# device tool's notes: Python 3.12, torch 2.11.0 (its CUDA build, which runs on a CPU), triton 3.6.0,
# transformers 5.17.0, tokenizers 0.23.2, numpy 2.5.2), with .whl/ installed as gpu_check.sh does:
# what breaks there for a version's sake breaks here first, at no device time. Needs python3.12 and
# the package registry (~5 GB into $TWIN the first time, ~3 minutes); then ~2 minutes a run.
#
#   bash scripts/gpu_rehearsal.sh          # the .whl/ wheels as gpu_check.sh's header fetches them
set -uo pipefail
cd "$(dirname "$0")/.."
TWIN=${TWIN:-/tmp/glm4serve-gpu-twin}
OUT=${OUT:-/tmp/glm4serve-gpu-rehearsal}
PY312=${PY312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}  # pyenv's, as here
PY312=${PY312:-python3.12}
if [ ! -x "$TWIN/bin/python" ]; then
    "$PY312" -m venv "$TWIN" || exit 1
    "$TWIN/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 \
        huggingface-hub==1.33.0 numpy==2.5.2 safetensors==0.8.0 tiktoken==0.14.0 sentencepiece==0.2.2 \
        jinja2 pyyaml tqdm prometheus-client httpx pytest uvloop click attrs annotated-doc regex || exit 1
fi
ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: fetch the wheels named in scripts/gpu_check.sh first"; exit 1; }
rm -rf "$OUT" /tmp/site && mkdir -p "$OUT"
"$TWIN/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$TWIN/bin/python" -m pytest -q -rfEs -p no:cacheprovider --device cpu tests/test_model_equivalence.py \
    tests/test_engine_with_model.py tests/test_prefix_cache_model.py tests/test_long_context.py \
    tests/test_paged_decode.py tests/test_gemv.py tests/test_one_row.py tests/test_sampler.py tests/test_e2e_server.py \
    tests/test_bench_gpu.py 2>&1 | tee "$OUT/pytest.log"
tests=$?
"$TWIN/bin/python" benchmarks/bench_gpu.py --tiny --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
bench=$?
echo "pytest exit $tests, bench_gpu --tiny exit $bench"
exit $((tests || bench))
