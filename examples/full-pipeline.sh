#!/usr/bin/env bash
# Constitutional AI end to end, as a person would run it. `make full-pipeline` calls this with caictl on PATH.
#
#   RUN=demo                  artifacts go to runs/$RUN/
#   MODEL=<folder or hub id>  the model to make harmless; empty builds an offline random-weight one
#   ENGINE=hf|openai          BASE_URL=http://.../v1 for openai
#
# Stages that have landed so far: revise (the supervised stage's data). sft, sample, label, train-pm, ppo and
# eval join this script as they land.
set -euo pipefail

RUN=${RUN:-demo}
OUT=runs/$RUN
ENGINE=${ENGINE:-hf}
mkdir -p "$OUT"

# 0. Models. Offline there is no hub: build a small random-weight chat model (it generates noise, but every
#    stage runs for real on it).
if [ -z "${MODEL:-}" ]; then
  MODEL=$OUT/models/base
  [ -f "$MODEL/caictl.json" ] || caictl init-model --preset small --out "$MODEL" >/dev/null
fi
ENGINE_FLAGS=(--engine "$ENGINE")
[ -n "${BASE_URL:-}" ] && ENGINE_FLAGS+=(--base-url "$BASE_URL")

# 1. SL-CAI data: critique -> revision, 4 rounds, a random principle each round. Re-running resumes.
caictl revise examples/red-team.jsonl -o "$OUT/revisions.jsonl" --model "$MODEL" "${ENGINE_FLAGS[@]}" \
  --rounds 4 --shots 1 --max-new-tokens 48 --batch-size 32

echo "revisions: $OUT/revisions.jsonl"
