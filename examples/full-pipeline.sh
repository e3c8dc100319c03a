#!/usr/bin/env bash
# Constitutional AI end to end, as a person would run it. `make full-pipeline` calls this with caictl on PATH.
#
#   RUN=demo                  artifacts go to runs/$RUN/
#   MODEL=<folder or hub id>  the model to make harmless; empty builds an offline random-weight one
#   FAMILY=qwen2.5|llama3|phi3  that offline model in a real family's shape, tokenizer and chat template
#   ENGINE=hf|openai          BASE_URL=http://.../v1 for openai
#
#   PM_MODEL=<folder or hub id>  the preference model's backbone; empty builds a random-weight one
#   HELPFUL=1                 also drive helpfulness by a constitution: the instruction prompts (INSTRUCTIONS) are
#                             revised and labelled under `helpful` beside the red-team prompts under `harmless`, one
#                             SFT and one PM on both, and the eval puts helpfulness Elo against harmlessness Elo
#
#   Smaller runs (the test suite runs one): PRESET=tiny (the default with FAMILY), ROUNDS, TOKENS, PPO_STEPS, PPO_BATCH, and the prompt
#   files RED_TEAM, HELPFUL_PROMPTS (also read as HELPFUL when that is not 1), INSTRUCTIONS and EVAL_PROMPTS
#   (space-separated). SET_CONSTITUTIONS (space-separated SET=NAME):
#   the constitution the judge asks each held-out set's question from; sets not named are judged as harmless.
#
# The prompts deduplicated and kept apart from the held-out ones, then SL-CAI (revise -> sft), then RL-CAI
# (sample -> label -> train-pm -> ppo), then eval on held-out prompts and one report for the whole run. Every
# stage resumes or skips what is already on disk, so a re-run is cheap.
set -euo pipefail

RUN=${RUN:-demo}
OUT=runs/$RUN
ENGINE=${ENGINE:-hf}
FAMILY=${FAMILY:-}
# A family model carries its real vocabulary (32k-152k tokens), so its small preset is already large.
PRESET=${PRESET:-$([ -n "$FAMILY" ] && echo tiny || echo small)}
FAMILY_FLAGS=()
[ -n "$FAMILY" ] && FAMILY_FLAGS=(--family "$FAMILY")
ROUNDS=${ROUNDS:-4}
TOKENS=${TOKENS:-48}
PPO_STEPS=${PPO_STEPS:-10}
PPO_BATCH=${PPO_BATCH:-16}
RED_TEAM=${RED_TEAM:-examples/red-team.jsonl}
# HELPFUL=1 turns the combined run on; any other HELPFUL is the helpfulness prompt file, as it always was.
COMBINED=0
if [ "${HELPFUL:-}" = 1 ]; then COMBINED=1; HELPFUL=; fi
HELPFUL=${HELPFUL_PROMPTS:-${HELPFUL:-examples/helpful.jsonl}}
INSTRUCTIONS=${INSTRUCTIONS:-examples/instructions.jsonl}
read -r -a EVAL_PROMPTS <<< "${EVAL_PROMPTS:-examples/held-out/harmless.jsonl examples/held-out/helpful.jsonl}"
read -r -a SET_CONSTITUTIONS <<< "${SET_CONSTITUTIONS:-helpful=helpful}"
mkdir -p "$OUT"
if [ "$COMBINED" = 1 ]; then
  # The instruction prompts split in two: most for training, the last 6 held out so the constraint shares in the
  # eval are measured on prompts no stage trained on.
  total=$(grep -c . "$INSTRUCTIONS")
  head -n $((total - 6)) "$INSTRUCTIONS" > "$OUT/instructions-train.jsonl"
  tail -n 6 "$INSTRUCTIONS" > "$OUT/instructions.jsonl"
  EVAL_PROMPTS+=("$OUT/instructions.jsonl")
  SET_CONSTITUTIONS+=("instructions=helpful")
fi

# Prompts. Every training prompt file loses its repeats and any prompt close to a held-out one, so the eval
# measures the models on prompts no stage trained on. Decontamination errs towards dropping: 0.5 rather than the
# default 0.6 also catches a paraphrase that changes more than one word (rt-007 is 0.56 from ho-h-001). What was
# dropped, and what it matched, is in $OUT/prompts/*.dropped.jsonl.
AGAINST=()
for held_out in "${EVAL_PROMPTS[@]}"; do AGAINST+=(--against "$held_out"); done
mkdir -p "$OUT/prompts"
caictl prompts dedupe "$RED_TEAM" "${AGAINST[@]}" --threshold 0.5 -o "$OUT/prompts/red-team.jsonl" \
  --dropped "$OUT/prompts/red-team.dropped.jsonl"
RED_TEAM=$OUT/prompts/red-team.jsonl
caictl prompts dedupe "$HELPFUL" "${AGAINST[@]}" --threshold 0.5 -o "$OUT/prompts/helpful.jsonl" \
  --dropped "$OUT/prompts/helpful.dropped.jsonl"
HELPFUL=$OUT/prompts/helpful.jsonl
if [ "$COMBINED" = 1 ]; then
  caictl prompts dedupe "$OUT/instructions-train.jsonl" "${AGAINST[@]}" --threshold 0.5 \
    -o "$OUT/prompts/instructions.jsonl" --dropped "$OUT/prompts/instructions.dropped.jsonl"
fi
INSTRUCTIONS_TRAIN=$OUT/prompts/instructions.jsonl
echo "prompts dropped (exact or near repeats, or close to a held-out prompt): $(cat "$OUT"/prompts/*.dropped.jsonl \
  | grep -c . || true)"

# 0. Models. Offline there is no hub: build a small random-weight chat model (it generates noise, but every
#    stage runs for real on it).
if [ -z "${MODEL:-}" ]; then
  MODEL=$OUT/models/base
  [ -f "$MODEL/caictl.json" ] || caictl init-model --preset "$PRESET" "${FAMILY_FLAGS[@]}" --out "$MODEL" >/dev/null
fi
ENGINE_FLAGS=(--engine "$ENGINE")
[ -n "${BASE_URL:-}" ] && ENGINE_FLAGS+=(--base-url "$BASE_URL")

# 1. SL-CAI data: critique -> revision, 4 rounds, a random principle each round. Re-running resumes.
caictl revise "$RED_TEAM" -o "$OUT/revisions.jsonl" --model "$MODEL" "${ENGINE_FLAGS[@]}" \
  --rounds "$ROUNDS" --shots 1 --max-new-tokens "$TOKENS" --batch-size 32
REVISIONS=("$OUT/revisions.jsonl")
if [ "$COMBINED" = 1 ]; then
  # The same method, driven by the helpful constitution: critiques ask whether the response did what was asked, in
  # the form asked, completely, accurately and without invention.
  caictl revise "$INSTRUCTIONS_TRAIN" -o "$OUT/revisions-helpful.jsonl" --model "$MODEL" \
    "${ENGINE_FLAGS[@]}" --constitution helpful --rounds "$ROUNDS" --shots 1 --max-new-tokens "$TOKENS" --batch-size 32
  REVISIONS+=("$OUT/revisions-helpful.jsonl")
fi

# 2. SL-CAI model: fine-tune on the final revisions, mixed with helpfulness conversations so the model stays
#    helpful (here: its own answers to the helpfulness prompts, the best we have offline).
caictl sample "$HELPFUL" -o "$OUT/helpful-answers.jsonl" --model "$MODEL" "${ENGINE_FLAGS[@]}" \
  -n 1 --max-new-tokens "$TOKENS" --batch-size 32
if [ "$ENGINE" = hf ]; then
  [ -f "$OUT/models/sl-cai/caictl.json" ] || caictl sft "${REVISIONS[@]}" --mix "$OUT/helpful-answers.jsonl:0.5" \
    --model "$MODEL" -o "$OUT/models/sl-cai" --epochs 1 --learning-rate 1e-4 --batch-size 8 --max-length 512
  POLICY=$OUT/models/sl-cai
else
  POLICY=$MODEL  # a served model is not fine-tuned here: sample from it as it is
fi

# The iterated pipeline (examples/iterated-pipeline.sh) takes over from the SL-CAI model.
[ "${SL_CAI_ONLY:-0}" = 1 ] && exit 0

# 3. RL-CAI data: two responses per red-team prompt from the SL-CAI model, for the feedback model to compare.
caictl sample "$RED_TEAM" -o "$OUT/pairs.jsonl" --model "$POLICY" "${ENGINE_FLAGS[@]}" \
  -n 2 --max-new-tokens "$TOKENS" --batch-size 32

# 4. AI feedback: the feedback model (here the base model, as in the paper) compares each pair under a
#    comparison principle; soft labels, both orders averaged.
caictl label "$OUT/pairs.jsonl" -o "$OUT/prefs.jsonl" --model "$MODEL" "${ENGINE_FLAGS[@]}" --batch-size 16
PREFS=("$OUT/prefs.jsonl")
PPO_PROMPTS=$RED_TEAM
if [ "$COMBINED" = 1 ]; then
  # Pairs on the instruction prompts, labelled under the helpful constitution's comparison principles; the PM and
  # PPO then see both kinds of prompt.
  caictl sample "$INSTRUCTIONS_TRAIN" -o "$OUT/pairs-helpful.jsonl" --model "$POLICY" \
    "${ENGINE_FLAGS[@]}" -n 2 --max-new-tokens "$TOKENS" --batch-size 32
  caictl label "$OUT/pairs-helpful.jsonl" -o "$OUT/prefs-helpful.jsonl" --model "$MODEL" "${ENGINE_FLAGS[@]}" \
    --constitution helpful --batch-size 16
  PREFS+=("$OUT/prefs-helpful.jsonl")
  cat "$RED_TEAM" "$INSTRUCTIONS_TRAIN" > "$OUT/ppo-prompts.jsonl"
  PPO_PROMPTS=$OUT/ppo-prompts.jsonl
fi

# 5. Preference model on the AI labels, soft targets, 10% held out.
if [ -z "${PM_MODEL:-}" ]; then
  PM_MODEL=$OUT/models/pm-base
  [ -f "$PM_MODEL/caictl.json" ] || caictl init-model --preset "$PRESET" "${FAMILY_FLAGS[@]}" --task seq-cls \
    --out "$PM_MODEL" >/dev/null
fi
[ -f "$OUT/models/pm/caictl.json" ] || caictl train-pm "${PREFS[@]}" --model "$PM_MODEL" -o "$OUT/models/pm" \
  --eval-split 0.1 --epochs 2 --learning-rate 1e-4 --max-length 256
[ -f "$OUT/pairs.scored.jsonl" ] || caictl score --pm "$OUT/models/pm" "$OUT/pairs.jsonl" -o "$OUT/pairs.scored.jsonl"

# 6. RL-CAI: PPO of the SL-CAI policy against the PM, KL-penalised, 10% of the prompts held out.
if [ "$ENGINE" = hf ]; then
  [ -f "$OUT/models/rl-cai/caictl.json" ] || caictl ppo "$PPO_PROMPTS" --policy "$POLICY" \
    --pm "$OUT/models/pm" -o "$OUT/models/rl-cai" --steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --minibatch-size $((PPO_BATCH / 2)) --max-new-tokens 32 \
    --learning-rate 1e-5 --kl-coef 0.05 --max-kl 20
fi

# 7. Eval on held-out prompts (harmlessness and helpfulness apart): the PM and the feedback model compare
#    the models pairwise, the judge asking the helpful set's questions from the helpful constitution; refusal,
#    boilerplate and length per model.
MODELS=(--model "base=$MODEL")
[ "$POLICY" != "$MODEL" ] && MODELS+=(--model "sl-cai=$POLICY")
[ -f "$OUT/models/rl-cai/caictl.json" ] && MODELS+=(--model "rl-cai=$OUT/models/rl-cai")
SET_FLAGS=()
for mapping in "${SET_CONSTITUTIONS[@]}"; do SET_FLAGS+=(--set-constitution "$mapping"); done
caictl eval compare "${EVAL_PROMPTS[@]}" "${MODELS[@]}" "${SET_FLAGS[@]}" \
  --pm "$OUT/models/pm" --judge "$MODEL" "${ENGINE_FLAGS[@]}" --max-new-tokens "$TOKENS" --batch-size 32 -o "$OUT/eval"

# 8. One report: every stage's figures, which principles drove revisions and labels, the comparison.
REPORT=$(caictl eval report "$OUT" -o "$OUT/report")
echo "report: $REPORT"
