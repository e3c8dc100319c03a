#!/usr/bin/env bash
# Iterated RL-CAI, online: the preference model keeps up with the policy. `make iterated-pipeline` calls this.
#
#   ITERATIONS=2   rounds of sample -> label -> train-pm -> ppo after the SL-CAI model
#   PM_RESET=1     retrain the PM from its base each round (default: continue from the last round's PM)
#   The variables of examples/full-pipeline.sh (RUN, MODEL, FAMILY, PRESET, ROUNDS, TOKENS, PPO_STEPS,
#   PPO_BATCH, RED_TEAM, HELPFUL, PM_MODEL) mean the same here; the hf engine only. EVAL_PROMPT: the held-out
#   prompts the report samples each round's policy on.
#
# SL-CAI first (full-pipeline.sh's steps up to the SL-CAI model, in runs/$RUN/). Round k then writes
# runs/$RUN/iter-k/: pairs sampled from the current policy, AI labels on them, a PM trained on every round's
# labels so far, and the policy after PPO against that PM. A finished round leaves iter-k/done and is skipped on a
# re-run; an unfinished one resumes, each stage from what it has on disk. The report (caictl eval iterations) shows
# each round's PM accuracy, reward before and after, KL from the SL-CAI model, refusal and boilerplate rates, and
# how often the previous round's PM disagreed with the new labels.
set -euo pipefail

export RUN=${RUN:-demo-iterated}
OUT=runs/$RUN
ITERATIONS=${ITERATIONS:-2}
PM_RESET=${PM_RESET:-0}
FAMILY=${FAMILY:-}
PRESET=${PRESET:-$([ -n "$FAMILY" ] && echo tiny || echo small)}
FAMILY_FLAGS=()
[ -n "$FAMILY" ] && FAMILY_FLAGS=(--family "$FAMILY")
TOKENS=${TOKENS:-48}
PPO_STEPS=${PPO_STEPS:-10}
PPO_BATCH=${PPO_BATCH:-16}
RED_TEAM=${RED_TEAM:-examples/red-team.jsonl}
EVAL_PROMPT=${EVAL_PROMPT:-examples/held-out/harmless.jsonl}  # held-out prompts for KL, refusal, boilerplate

# SL-CAI: the base model, revisions, the fine-tuned SL-CAI model (resumes or skips what is on disk).
# Its training prompts are kept apart from this run's held-out prompts.
SL_CAI_ONLY=1 ENGINE=hf PRESET="$PRESET" EVAL_PROMPTS="$EVAL_PROMPT" bash "$(dirname "$0")/full-pipeline.sh"
MODEL=${MODEL:-$OUT/models/base}
SL_CAI=$OUT/models/sl-cai
if [ -z "${PM_MODEL:-}" ]; then
  PM_MODEL=$OUT/models/pm-base
  [ -f "$PM_MODEL/caictl.json" ] || caictl init-model --preset "$PRESET" "${FAMILY_FLAGS[@]}" --task seq-cls \
    --out "$PM_MODEL" >/dev/null
fi

POLICY=$SL_CAI
PM=
LABELS=()
for k in $(seq 1 "$ITERATIONS"); do
  ITER=$OUT/iter-$k
  LABELS+=("$ITER/prefs.jsonl")
  if [ -f "$ITER/done" ]; then
    POLICY=$ITER/policy PM=$ITER/pm
    continue
  fi
  mkdir -p "$ITER"
  echo "iteration $k of $ITERATIONS: $ITER" >&2
  # New pairs from the current policy (a seed per round, so each round samples afresh), labelled by the feedback
  # model (the base model, as in the paper).
  caictl sample "$RED_TEAM" -o "$ITER/pairs.jsonl" --model "$POLICY" -n 2 --max-new-tokens "$TOKENS" \
    --batch-size 32 --seed "$k"
  caictl label "$ITER/pairs.jsonl" -o "$ITER/prefs.jsonl" --model "$MODEL" --batch-size 16
  # The PM on every round's labels so far: continued from the last round's PM, or from its base (PM_RESET=1).
  START=$PM_MODEL
  [ -n "$PM" ] && [ "$PM_RESET" != 1 ] && START=$PM
  [ -f "$ITER/pm/caictl.json" ] || caictl train-pm "${LABELS[@]}" --model "$START" -o "$ITER/pm" \
    --eval-split 0.1 --epochs 2 --learning-rate 1e-4 --max-length 256
  # PPO from the current policy against the new PM.
  [ -f "$ITER/policy/caictl.json" ] || caictl ppo "$RED_TEAM" --policy "$POLICY" --pm "$ITER/pm" \
    -o "$ITER/policy" --steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --minibatch-size $((PPO_BATCH / 2)) \
    --max-new-tokens 32 --learning-rate 1e-5 --kl-coef 0.05 --max-kl 20 --seed "$k"
  touch "$ITER/done"
  POLICY=$ITER/policy PM=$ITER/pm
done

caictl eval iterations "$OUT" --prompts "$EVAL_PROMPT" --reference "$SL_CAI" --max-new-tokens "$TOKENS" \
  -o "$OUT/iterations"
