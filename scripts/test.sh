#!/usr/bin/env bash
# Sets up, builds and runs every CPU test: the C++ suites (ctest label cpu) and the server's
# integration tests with the official openai client (pytest). GPU tests (label gpu) are built
# when nvcc is present and run on a GPU machine with: ctest --test-dir build -L gpu
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
# One OpenMP thread per test process: ctest runs tests in parallel on few cores.
OMP_NUM_THREADS=1 ctest --test-dir "$BUILD" -L cpu -j "$(nproc)" --output-on-failure --timeout 900
BIGMOE_BINARY="$PWD/$BUILD/bigmoe" "$VENV/bin/python" -m pytest -q tests/server
