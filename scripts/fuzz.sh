#!/usr/bin/env bash
# Fuzz the server from its own OpenAPI schema with schemathesis: every request it generates,
# valid or not, must get an answer that is not a 5xx, and the server must stay up.
#
#   scripts/fuzz.sh [SECONDS]      (default 300; needs `make install` or the test extra)
#
# Starts `glm4serve serve` on a random small checkpoint (context 128, at most 32 new tokens: short)
# with an API key, runs `st run` for SECONDS with a random seed, then checks /health and the log.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_BUDGET="${1:-300}"
BIN="$(cd "${BIN:-.venv/bin}" && pwd)"
WORK="$(mktemp -d)"
PORT="${PORT:-18777}"
trap 'kill "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$BIN/glm4serve" make-model "$WORK/ckpt" --hidden-size 96 --intermediate-size 160 --layers 3 --heads 6 \
  --kv-heads 3 --head-dim 32 > /dev/null
"$BIN/glm4serve" serve --model "$WORK/ckpt" --port "$PORT" --dtype float32 --kv-cache-memory 64MiB \
  --max-model-len 128 --max-tokens-limit 32 --api-key fuzz > "$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.3; done

status=0
cd "$WORK"  # schemathesis keeps its state in ./.schemathesis: not in the repo
"$BIN/st" run "http://127.0.0.1:$PORT/openapi.json" -H "Authorization: Bearer fuzz" \
  --checks not_a_server_error --max-time "$SECONDS_BUDGET" --request-timeout 60 || status=$?

curl -sf "http://127.0.0.1:$PORT/health" > /dev/null || { echo "server not healthy after the run"; status=1; }
if grep -E "Traceback|unhandled error" "$WORK/server.log"; then echo "errors in the server log"; status=1; fi
grep -oE 'HTTP/1.1" [0-9]+' "$WORK/server.log" | sort | uniq -c
exit $status
