#!/usr/bin/env bash
# The whole pipeline: SFT -> DPO -> hard-sample mining + training (the methodology's stages
# 1-3), PPO as the RL alternative, every stage evaluated side by side, LoRA merged and checked.
#
#   bash run.sh quick                    # tiny model + synthetic vessel videos, CPU, minutes
#   MODEL=/path/Sa2VA-4B DATA=/path/vessels BF16=1 bash run.sh full
#
# Environment (all optional):
#   MODEL      base Sa2VA folder (InternVL or Qwen-VL family), `tiny` or `tiny-qwenvl` (default: tiny)
#   DATA       data folder (images/ + masks/ or annotations.json); default: synthetic videos in $OUT/data
#   FORMAT     layout of the generated synthetic data: masks | annotations (default masks)
#   OUT        output folder (default outputs/<preset>)
#   STAGES     comma list of sft,dpo,hard,ppo,eval,video,merge (default: all); a finished stage is
#              skipped, an interrupted one resumes, STAGES=hard re-runs only that one
#   NUM_GPUS   GPUs per node (default: all visible); HOSTFILE for several nodes
#   ENGINE     engine of the training scripts under the deepspeed launcher: torch (default; plain-torch data
#              parallel, fused AdamW: the faster step for LoRA, README "Performance") or deepspeed (ZeRO)
#   ZERO_STAGE DeepSpeed ZeRO stage with ENGINE=deepspeed (default 2); BF16=1 for bf16
#   COMPILE=1  SFT with --compile (torch.compile of the LLM's decoder layers; GPU: 1.5x on the LLM step)
#   MAX_TRAIN, MAX_VAL  caps on frames (default: preset's)
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-quick}
case "$PRESET" in quick|full) ;; *) echo "usage: bash run.sh quick|full" >&2; exit 2 ;; esac
MODEL=${MODEL:-tiny}
OUT=${OUT:-outputs/$PRESET}
FORMAT=${FORMAT:-masks}
STAGES=${STAGES:-sft,dpo,hard,ppo,eval,video,merge}
ZERO_STAGE=${ZERO_STAGE:-2}
PYTHON=${PYTHON:-python}
TINY=0
case "$MODEL" in tiny|tiny-qwenvl) TINY=1 ;; esac  # the embedded stand-ins (InternVL / Qwen-VL family)

# ---- sizes and per-stage settings: the mission's numbers; the tiny model needs larger steps
if [ "$PRESET" = quick ] && [ "$TINY" = 1 ]; then
  # the tiny stand-in needs more frames than the mission's 50 to learn anything (README)
  MAX_TRAIN=${MAX_TRAIN:-100}; MAX_VAL=${MAX_VAL:-24}; EPOCHS=1
elif [ "$PRESET" = quick ]; then
  MAX_TRAIN=${MAX_TRAIN:-50}; MAX_VAL=${MAX_VAL:-20}; EPOCHS=1
else
  MAX_TRAIN=${MAX_TRAIN:-1000}; MAX_VAL=${MAX_VAL:-100}; EPOCHS=3
fi
if [ "$TINY" = 1 ]; then
  # a 0.3M-parameter stand-in learns in more, larger steps than a 4B model (README, "Quick run")
  SFT_ARGS="--epochs 8 --lr 3e-3 --lora_preset small"
  DPO_ARGS="--epochs 1 --lr 3e-4 --beta 100 --grad_accum 1"  # beta: README, "DPO"
  HARD_ARGS="--epochs 5 --lr 1e-3"
  # the tiny model is far below 0.75 on almost every frame: take the washed-out ones as hard
  MINE_ARGS="--threshold_hard 0.3"
  PPO_ARGS="--epochs 2 --lr 5e-4 --group_size 8 --kl_coef 0.02"
else
  SFT_ARGS="--epochs $EPOCHS --lr 1e-4 --lora_preset medium"
  DPO_ARGS="--epochs 1 --lr 5e-6 --grad_accum 4"
  HARD_ARGS="--epochs 5 --lr 1e-5 --grad_accum 2 --weight_decay 0.01"
  MINE_ARGS="--threshold_hard 0.75"
  PPO_ARGS="--epochs 1 --lr 1e-5"
fi
# the embedded tiny models are built in memory by every script that loads them (~20-40 s of CPU each:
# the LLM is taught its answer): build one once, as a folder under $OUT, and hand that to every stage
MODEL_ARG=$MODEL
if [ "$TINY" = 1 ]; then
  MODEL_ARG="$OUT/model_$MODEL"
  if [ ! -f "$MODEL_ARG/config.json" ]; then
    rm -rf "$MODEL_ARG.tmp"
    mkdir -p "$OUT"
    $PYTHON -m "common.$(echo "$MODEL" | tr - _)" --out "$MODEL_ARG.tmp"
    mv "$MODEL_ARG.tmp" "$MODEL_ARG"
  fi
fi
COMMON="--model $MODEL_ARG --max_train_samples $MAX_TRAIN --max_val_samples $MAX_VAL"
[ "${BF16:-0}" = 1 ] && COMMON="$COMMON --bf16"

# ---- launcher: DeepSpeed when it and GPUs are there, plain python otherwise
GPUS=0
command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
if [ "$GPUS" -gt 0 ] && command -v deepspeed >/dev/null 2>&1; then
  NUM_GPUS=${NUM_GPUS:-$GPUS}
  LAUNCH="deepspeed --num_gpus $NUM_GPUS --master_port ${MASTER_PORT:-29513}"
  [ -n "${HOSTFILE:-}" ] && LAUNCH="deepspeed --hostfile $HOSTFILE --master_port ${MASTER_PORT:-29513}"
  TRAIN_EXTRA="--engine ${ENGINE:-torch} --zero_stage $ZERO_STAGE"
else
  LAUNCH="$PYTHON"
  TRAIN_EXTRA=""
fi

banner() { printf '\n==== %s ====\n' "$*"; }
wants() { [[ ",$STAGES," == *",$1,"* ]]; }
# a stage's run folder: the newest <OUT>/<stage>/<stage>_* (empty when none)
run_dir() { ls -d "$OUT/$1/$1"_* 2>/dev/null | sort | tail -n 1 || true; }
# run a training stage unless it finished; resume it when it was interrupted
train() {
  local stage=$1 script=$2; shift 2
  local dir; dir=$(run_dir "$stage")
  if [ -n "$dir" ] && [ -f "$dir/training_info.json" ] && ! [[ ",${RERUN:-}," == *",$stage,"* ]]; then
    echo "$stage: finished earlier in $dir (RERUN=$stage to run it again)"; return
  fi
  local resume=""
  [ -n "$dir" ] && [ ! -f "$dir/training_info.json" ] && resume="--resume $dir" && echo "$stage: resuming $dir"
  $LAUNCH "$script" $COMMON --data "$DATA" --output "$OUT/$stage" $TRAIN_EXTRA $resume "$@"
}

mkdir -p "$OUT"
START=$(date +%s)
if [ -z "${DATA:-}" ]; then
  DATA="$OUT/data"
  banner "synthetic vessel videos -> $DATA"
  $PYTHON -m common.synth --out "$DATA" --videos 12 --frames 12 --size 128 --seed 0 --format "$FORMAT"
fi

if wants sft; then
  banner "stage 1: LoRA SFT (Dice + BCE through the forward path)"
  [ "${COMPILE:-0}" = 1 ] && SFT_ARGS="$SFT_ARGS --compile"
  train sft train_sft.py $SFT_ARGS
fi
SFT=$(run_dir sft)/best

if wants dpo; then
  banner "stage 2: DPO pairs (GT chosen, the SFT model's worse prediction rejected) and DPO"
  [ -f "$OUT/pairs/dpo_annotations.json" ] || \
    $PYTHON make_dpo_pairs.py $COMMON --data "$DATA" --init "$SFT" --mode generate --output "$OUT/pairs"
  train dpo train_dpo.py --init "$SFT" --pairs "$OUT/pairs/dpo_annotations.json" $DPO_ARGS
fi
DPO=$(run_dir dpo)/best

if wants hard; then
  banner "stage 3: hard-sample mining (Dice < 0.75, temporal clusters) and hard training"
  [ -f "$OUT/mine/hard_samples.json" ] || \
    $PYTHON mine_hard.py $COMMON --data "$DATA" --init "$DPO" --split train --output "$OUT/mine" --plot $MINE_ARGS
  train hard train_hard.py --init "$DPO" --hard_list "$OUT/mine/hard_samples.json" $MINE_ARGS $HARD_ARGS
fi
HARD=$(run_dir hard)/best

if wants ppo; then
  banner "RL alternative: PPO with segmentation rewards, from the SFT model"
  train ppo train_ppo.py --init "$SFT" $PPO_ARGS
fi
PPO=$(run_dir ppo)/best

if wants eval; then
  banner "evaluation: every stage side by side"
  CKPTS="base"
  for pair in "sft=$SFT" "dpo=$DPO" "hard=$HARD" "ppo=$PPO"; do
    [ -f "${pair#*=}/stage.json" ] && CKPTS="$CKPTS $pair"
  done
  $PYTHON evaluate.py --model "$MODEL_ARG" --data "$DATA" --max_val_samples "$MAX_VAL" --checkpoints $CKPTS \
    --output "$OUT/eval" --panel 4 --overlays 2
fi

if wants video && [ -f "$HARD/stage.json" ]; then
  banner "SAM2 video memory: per-frame vs video mode, on all validation frames and on the temporal hard clusters"
  if [ "$($PYTHON -c "import json, os, sys; from common.sa2va import QWENVL, folder_family; m = sys.argv[1]
print(m == 'tiny-qwenvl' or (os.path.isfile(f'{m}/config.json') and folder_family(json.load(open(f'{m}/config.json'))) == QWENVL))" "$MODEL")" = True ]; then
    echo "video mode follows the InternVL family's released video inference: skipped for $MODEL"
  else
    # the clusters are mined on the validation split with the final model, then both modes are scored there
    [ -f "$OUT/mine_val/hard_samples.json" ] || \
      $PYTHON mine_hard.py $COMMON --data "$DATA" --init "$HARD" --split val --output "$OUT/mine_val" $MINE_ARGS
    $PYTHON evaluate.py --model "$MODEL_ARG" --data "$DATA" --max_val_samples "$MAX_VAL" --checkpoints "sft=$SFT" \
      "hard=$HARD" --video_mode --hard_clusters "$OUT/mine_val/hard_samples.json" --output "$OUT/eval_video" \
      --overlays 0 --no_cldice
  fi
fi

if wants merge && [ -f "$HARD/stage.json" ]; then
  banner "merge: fold LoRA + trained heads of the stage-3 model into a standalone checkpoint, and check it"
  $PYTHON merge_lora.py --base_model "$MODEL_ARG" --lora_weights "$HARD" --output_model "$OUT/merged" --overwrite
fi

banner "done in $(( $(date +%s) - START )) s"
[ -f "$OUT/eval/stage_table.md" ] && cat "$OUT/eval/stage_table.md"
if [ -f "$OUT/eval_video/stage_table.md" ]; then
  printf '\nSAM2 video memory (validation):\n'
  tail -n 4 "$OUT/eval_video/stage_table.md"
fi
echo "outputs: $OUT (eval/metrics.csv, eval/summary.json, eval/panel.png, mine/hard_samples.json, merged/)"
