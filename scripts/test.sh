#!/usr/bin/env bash
# Sets up, builds and runs every CPU test (ctest label cpu). GPU tests (label gpu) are
# compiled when nvcc is present and run on a GPU machine with: ctest --test-dir build -L gpu
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
ctest --test-dir "${BIGMOE_BUILD_DIR:-build}" -L cpu -j "$(nproc)" --output-on-failure --timeout 600
