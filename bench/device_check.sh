#!/usr/bin/env bash
# Runs on the GPU machine over test binaries built here (carried in .devbuild/): every GPU
# test (ctest label gpu). Build: cmake -S . -B build-cuda3 -G Ninja -DCMAKE_BUILD_TYPE=Release &&
# ninja -C build-cuda3; strip the tests/test_cuda_* binaries into .devbuild/bin and copy
# libfmt.so.9, libgomp.so.1, libcudart.so.13 into .devbuild/lib. Usage: bash bench/device_check.sh
set -u
export LD_LIBRARY_PATH=$PWD/.devbuild/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rc=0
for t in .devbuild/bin/test_cuda_*; do
  echo "== $t"
  BIGMOE_FIXTURES=$PWD/tests/fixtures "$t" --gtest_brief=1 2>&1 | tail -6 || rc=1
done
exit $rc
