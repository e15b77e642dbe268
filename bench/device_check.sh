#!/usr/bin/env bash
# Runs on the GPU machine over binaries built here (carried in .devbuild/): the GPU tests,
# then the CPU model tests on that machine's CPU. Usage: bash bench/device_check.sh
set -u
export LD_LIBRARY_PATH=$PWD/.devbuild/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc; grep -m1 "model name" /proc/cpuinfo
for t in .devbuild/bin/test_cuda_ops .devbuild/bin/test_glm_dsa; do
  echo "== $t"
  BIGMOE_FIXTURES=$PWD/tests/fixtures "$t" --gtest_brief=1 2>&1 | tail -15
done
