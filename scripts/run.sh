#!/usr/bin/env bash
# Sets up, builds and runs the main job. Until the server lands (issue: real models end to
# end), that is greedy generation on the tiny GLM-5-shaped reference model that the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL=tests/fixtures/glm5_tiny
PROMPT=$(python3 -c "import json; print(','.join(map(str, json.load(open('$MODEL/ref.json'))['prompt_ids'])))")
echo "bigmoe run -m $MODEL --prompt-ids <48 ids> -n 16"
"${BIGMOE_BUILD_DIR:-build}/bigmoe" run -m "$MODEL" --prompt-ids "$PROMPT" -n 16 --ignore-eos
