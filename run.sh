#!/usr/bin/env bash
# The whole pipeline: SFT -> DPO -> hard-sample mining + training (the methodology's stages
# 1-3), PPO as the RL alternative, every stage evaluated side by side, LoRA merged and checked.
#
#   bash run.sh quick                    # tiny model + synthetic vessel videos, CPU, minutes
#   MODEL=/path/Sa2VA-4B DATA=/path/vessels BF16=1 bash run.sh full
#   DATA=/path/20_to_40_still_images SEEDS=3 bash run.sh real     # a small real folder, 3 seeds, gains
#   VIDEOS=/path/cine_runs MODEL=/path/Sa2VA-4B bash run.sh full   # from angiography videos: frames first
#
# Presets: quick (caps of 100 / 24 frames, short stages), full (the mission's 1000 / 100 frames),
# real (every frame of a small real folder, longer SFT; DATA given => STILL_IMAGES=1 unless set).
#
# Environment (all optional):
#   MODEL      base Sa2VA folder (InternVL or Qwen-VL family), `tiny` or `tiny-qwenvl` (default: tiny)
#   DATA       data folder (images/ + masks/ or annotations.json); default: synthetic videos in $OUT/data
#   VIDEOS     folder of cine runs (DICOM, MP4/AVI, GIF/TIFF, folders of frames): the training frames are first
#              sampled from it into DATA (default $OUT/data) with python -m common.frames (PER_VIDEO frames a run,
#              default 20; DRAFTS_FROM=<stage checkpoint> adds draft masks for annotators in drafts/). Until that
#              folder has masks/ (or annotations.json) the run stops there (exit 3), saying what to label; run the
#              same command again once they are there (a DATA that already has images/ is not sampled again)
#   FORMAT     layout of the generated synthetic data: masks | annotations (default masks)
#   OUT        output folder (default outputs/<preset> in this project folder)
#              (relative MODEL, DATA, OUT and HOSTFILE are read from the directory you run this in)
#   STILL_IMAGES=1  DATA is a folder of still images, not video frames (drive_01.png ... drive_20.png): each
#              image is its own video (--still_images); the video stage is skipped
#   MASK_RULE, VESSEL_VALUES  how mask values become vessel (--mask_rule, --vessel_values; README "Your own data")
#   STAGES     comma list of sft,dpo,hard,ppo,eval,video,merge (default: all); a finished stage is
#              skipped, an interrupted one resumes, STAGES=hard re-runs only that one
#   NUM_GPUS   GPUs per node (default: all visible); HOSTFILE for several nodes
#   ENGINE     engine of the training scripts under the deepspeed launcher: torch (default; plain-torch data
#              parallel, fused AdamW: the faster step for LoRA, README "Performance") or deepspeed (ZeRO)
#   ZERO_STAGE DeepSpeed ZeRO stage with ENGINE=deepspeed (default 2); BF16=1 for bf16
#   SAM_ENCODER=1  SFT also trains SAM2's image encoder (--trainable ...,sam_encoder); default 1 for the real preset
#              with the embedded model, 0 otherwise (README "Real images")
#   CURRICULUM=area  SFT and hard training with --curriculum area (large vessels first; CURRICULUM_PHASES, default 3)
#   COMPILE=1  SFT with --compile (torch.compile of the LLM's decoder layers; GPU: 1.5x on the LLM step)
#   MAX_TRAIN, MAX_VAL  caps on frames (default: preset's)
#   SEED       seed of split, initialisation and order of every stage (default 0)
#   SEEDS=N    the whole pipeline N times (seeds 0..N-1, into $OUT/seed_<k>), then each stage's gain over its
#              start with its 95% interval over the seeds ($OUT/gains.md; python -m common.seeds)
#   BASELINES  1 (default): Frangi (no learning), a U-Net trained on the same split and the mask grid's
#              ceiling as rows of the stage table, with each stage's Dice gap to the U-Net; 0 skips them. UNET_PRESET: small
#              (quick) or strong (full) by default; UNET_STEPS: its optimizer steps (default: the preset's,
#              200 / 3000) (README "Baselines")
set -euo pipefail
# paths the user typed are relative to the directory they typed them in, not to this project
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
[ -n "${DATA:-}" ] && DATA=$(abspath "$DATA")
[ -n "${VIDEOS:-}" ] && VIDEOS=$(abspath "$VIDEOS")
[ -n "${DRAFTS_FROM:-}" ] && DRAFTS_FROM=$(abspath "$DRAFTS_FROM")
[ -n "${OUT:-}" ] && OUT=$(abspath "$OUT")
[ -n "${HOSTFILE:-}" ] && HOSTFILE=$(abspath "$HOSTFILE")
[ -n "${MODEL:-}" ] && [ -e "$MODEL" ] && MODEL=$(abspath "$MODEL")  # `tiny` and friends are names, not paths
cd "$(dirname "$0")"

PRESET=${1:-quick}
case "$PRESET" in quick|full|real) ;; *) echo "usage: bash run.sh quick|full|real" >&2; exit 2 ;; esac
MODEL=${MODEL:-tiny}
OUT=${OUT:-outputs/$PRESET}
PYTHON=${PYTHON:-python}
if [ "${SEEDS:-1}" -gt 1 ] && [ -z "${SEED:-}" ]; then
  # one whole pipeline per seed, on the same data, then every stage against its own start, paired by seed
  mkdir -p "$OUT"
  for k in $(seq 0 $((SEEDS - 1))); do
    printf '\n######## seed %s of %s -> %s/seed_%s\n' "$k" "$SEEDS" "$OUT" "$k"
    SEED=$k OUT="$OUT/seed_$k" bash "$0" "$PRESET"
  done
  "$PYTHON" -m common.seeds "$OUT"/seed_*/eval/summary.json --output "$OUT/gains.md"
  exit 0
fi
SEED=${SEED:-0}
[ "$PRESET" = real ] && [ -n "${DATA:-}" ] && STILL_IMAGES=${STILL_IMAGES:-1}
FORMAT=${FORMAT:-masks}
STAGES=${STAGES:-sft,dpo,hard,ppo,eval,video,merge}
ZERO_STAGE=${ZERO_STAGE:-2}
TINY=0
case "$MODEL" in tiny|tiny-qwenvl) TINY=1 ;; esac  # the embedded stand-ins (InternVL / Qwen-VL family)

# ---- sizes and per-stage settings: the mission's numbers; the tiny model needs larger steps
if [ "$PRESET" = quick ] && [ "$TINY" = 1 ]; then
  # the tiny stand-in needs more frames than the mission's 50 to learn anything (README)
  MAX_TRAIN=${MAX_TRAIN:-100}; MAX_VAL=${MAX_VAL:-24}; EPOCHS=1
elif [ "$PRESET" = quick ]; then
  MAX_TRAIN=${MAX_TRAIN:-50}; MAX_VAL=${MAX_VAL:-20}; EPOCHS=1
elif [ "$PRESET" = real ]; then
  MAX_TRAIN=${MAX_TRAIN:-0}; MAX_VAL=${MAX_VAL:-0}; EPOCHS=20  # all frames: a small folder has 20-40
else
  MAX_TRAIN=${MAX_TRAIN:-1000}; MAX_VAL=${MAX_VAL:-100}; EPOCHS=3
fi
# argument lists are bash arrays: every path keeps its spaces (${A[@]+"${A[@]}"}: an empty array
# under set -u on bash < 4.4)
if [ "$TINY" = 1 ]; then
  # a 2.4M-parameter stand-in learns in more, larger steps than a 4B model (README, "Quick run"); on a
  # small real folder it needs more passes, its encoder trained and flipped / rotated frames (README,
  # "Real images": 100 epochs of 16 DRIVE frames)
  if [ "$PRESET" = real ]; then
    SFT_ARGS=(--epochs 100 --lr 1e-3 --augment --lora_preset small)
    SAM_ENCODER=${SAM_ENCODER:-1}
  else
    SFT_ARGS=(--epochs 8 --lr 3e-3 --lora_preset small)
  fi
  DPO_ARGS=(--epochs 1 --lr 3e-4 --beta 100 --grad_accum 1)  # beta: README, "DPO"
  HARD_ARGS=(--epochs 5 --lr 1e-3)
  HARD_DICE=0.75  # the mission's: the pretrained tiny model scores ~0.7-0.8 on the synthetic videos
  PPO_ARGS=(--epochs 2 --lr 2e-4 --group_size 8 --kl_coef 0.02)  # 5e-4 overshoots the pretrained model (tests/test_ppo.py)
else
  SFT_ARGS=(--epochs "$EPOCHS" --lr 1e-4 --lora_preset medium)
  DPO_ARGS=(--epochs 1 --lr 5e-6 --grad_accum 4)
  HARD_ARGS=(--epochs 5 --lr 1e-5 --grad_accum 2 --weight_decay 0.01)
  HARD_DICE=0.75
  PPO_ARGS=(--epochs 1 --lr 1e-5)
fi
MINE_ARGS=(--threshold_hard "$HARD_DICE")
[ "${SAM_ENCODER:-0}" = 1 ] && SFT_ARGS+=(--trainable lora,text_hidden_fcs,mask_decoder,sam_encoder)
if [ -n "${CURRICULUM:-}" ]; then
  SFT_ARGS+=(--curriculum "$CURRICULUM" --curriculum_phases "${CURRICULUM_PHASES:-3}")
  HARD_ARGS+=(--curriculum "$CURRICULUM" --curriculum_phases "${CURRICULUM_PHASES:-3}")
fi
# the data flags every script gets (evaluate.py too)
DATA_ARGS=()
[ "${STILL_IMAGES:-0}" = 1 ] && DATA_ARGS+=(--still_images)
[ -n "${MASK_RULE:-}" ] && DATA_ARGS+=(--mask_rule "$MASK_RULE")
[ -n "${VESSEL_VALUES:-}" ] && DATA_ARGS+=(--vessel_values "$VESSEL_VALUES")
COMMON=(--model "$MODEL" --seed "$SEED" --max_train_samples "$MAX_TRAIN" --max_val_samples "$MAX_VAL"
        ${DATA_ARGS[@]+"${DATA_ARGS[@]}"})
[ "${BF16:-0}" = 1 ] && COMMON+=(--bf16)

# ---- launcher: DeepSpeed when it and GPUs are there, plain python otherwise
GPUS=0
command -v nvidia-smi >/dev/null 2>&1 && GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
if [ "$GPUS" -gt 0 ] && command -v deepspeed >/dev/null 2>&1; then
  NUM_GPUS=${NUM_GPUS:-$GPUS}
  LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29513}")
  [ -n "${HOSTFILE:-}" ] && LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29513}")
  TRAIN_EXTRA=(--engine "${ENGINE:-torch}" --zero_stage "$ZERO_STAGE")
else
  LAUNCH=("$PYTHON")
  TRAIN_EXTRA=()
fi

if [ "$TINY" = 1 ] && [ "$GPUS" = 0 ] && [ "$PRESET" = quick ]; then
  # minutes on a CPU: the tiny model's SAM2 at 256 px instead of the released 1024 (same weights, a 64 x 64
  # mask grid; README "The embedded model")
  export SA2VA_TINY_SAM_SIZE=${SA2VA_TINY_SAM_SIZE:-256}
fi

banner() { printf '\n==== %s ====\n' "$*"; }
# a stage with nothing to learn from (no preference pair, no hard frame; its JSON counts 0) is skipped
nothing_to_learn() {
  [ -f "$1" ] && [ "$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2")" = 0 ]
}
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
  local resume=()
  if [ -n "$dir" ] && [ ! -f "$dir/training_info.json" ]; then resume=(--resume "$dir"); echo "$stage: resuming $dir"; fi
  "${LAUNCH[@]}" "$script" "${COMMON[@]}" --data "$DATA" --output "$OUT/$stage" ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"} ${resume[@]+"${resume[@]}"} "$@"
}

mkdir -p "$OUT"
START=$(date +%s)
if [ -n "${VIDEOS:-}" ]; then
  DATA=${DATA:-$OUT/data}
  if [ -d "$DATA/images" ]; then
    banner "frames from videos: $DATA/images exists, not sampled again from $VIDEOS (remove it to sample anew)"
  else
    banner "frames from videos: $VIDEOS -> $DATA (contrast span, heartbeat phases, no near-duplicates; common/frames.py)"
    FRAME_ARGS=(--videos "$VIDEOS" --out "$DATA" --per_video "${PER_VIDEO:-20}" --seed "$SEED" --strips)
    [ -n "${DRAFTS_FROM:-}" ] && FRAME_ARGS+=(--init "$DRAFTS_FROM" --model "$MODEL")
    "$PYTHON" -m common.frames "${FRAME_ARGS[@]}"
  fi
  if [ ! -d "$DATA/masks" ] && [ ! -f "$DATA/annotations.json" ]; then
    echo "run.sh: $DATA holds frames sampled from $VIDEOS but no masks yet: label them as $DATA/masks/<same name>.png" \
      "$([ -d "$DATA/drafts" ] && echo "(drafts/ holds predicted DRAFT masks to start from) ")and run the same command" \
      "again (manifest.json says where each frame comes from, strips/ shows the choice)" >&2
    exit 3
  fi
fi
if [ -z "${DATA:-}" ]; then
  DATA="$OUT/data"
  banner "synthetic vessel videos -> $DATA"
  "$PYTHON" -m common.synth --out "$DATA" --videos 12 --frames 12 --size 128 --seed 0 --format "$FORMAT"
fi

if wants sft; then
  banner "stage 1: LoRA SFT (Dice + BCE through the forward path)"
  [ "${COMPILE:-0}" = 1 ] && SFT_ARGS+=(--compile)
  train sft train_sft.py "${SFT_ARGS[@]}"
fi
SFT=$(run_dir sft)/best

if wants dpo; then
  banner "stage 2: DPO pairs (the SFT model's own masks, greedy + sampled, ranked by IoU to the GT: best chosen, worst rejected) and DPO"
  # no pair passing the IoU gap (a model whose samples agree) leaves summary.json alone: nothing to learn from
  [ -f "$OUT/pairs/summary.json" ] || \
    "$PYTHON" make_dpo_pairs.py "${COMMON[@]}" --data "$DATA" --init "$SFT" --mode generate --output "$OUT/pairs" || \
    [ -f "$OUT/pairs/summary.json" ]
  if nothing_to_learn "$OUT/pairs/summary.json" pairs; then
    echo "dpo: skipped, no preference pair ($OUT/pairs/summary.json); the dpo row is its start, the SFT checkpoint"
  else
    train dpo train_dpo.py --init "$SFT" --pairs "$OUT/pairs/dpo_annotations.json" "${DPO_ARGS[@]}"
  fi
fi
DPO=$(run_dir dpo)/best
if nothing_to_learn "$OUT/pairs/summary.json" pairs; then DPO=$SFT; fi  # its row is its start; hard starts there

if wants hard; then
  banner "stage 3: hard-sample mining (Dice < $HARD_DICE$([ "${STILL_IMAGES:-0}" = 1 ] || echo ', temporal clusters')) and hard training"
  [ -f "$OUT/mine/hard_samples.json" ] || \
    "$PYTHON" mine_hard.py "${COMMON[@]}" --data "$DATA" --init "$DPO" --split train --output "$OUT/mine" --plot \
      "${MINE_ARGS[@]}"
  if nothing_to_learn "$OUT/mine/hard_samples.json" hard_count; then
    echo "hard: skipped, no train frame below Dice $HARD_DICE ($OUT/mine/hard_samples.json); the hard row is its start"
  else
    train hard train_hard.py --init "$DPO" --hard_list "$OUT/mine/hard_samples.json" "${MINE_ARGS[@]}" "${HARD_ARGS[@]}"
  fi
fi
HARD=$(run_dir hard)/best
if nothing_to_learn "$OUT/mine/hard_samples.json" hard_count; then HARD=$DPO; fi

if wants ppo; then
  banner "RL alternative: PPO with segmentation rewards, from the SFT model"
  train ppo train_ppo.py --init "$SFT" "${PPO_ARGS[@]}"
fi
PPO=$(run_dir ppo)/best

BASELINE_ARGS=()
if wants eval && [ "${BASELINES:-1}" = 1 ]; then
  banner "baseline: a U-Net trained on the same split (Frangi, no learning, is fitted by evaluate.py)"
  UNET=$(run_dir unet)
  if [ -z "$UNET" ] || [ ! -f "$UNET/training_info.json" ] || [[ ",${RERUN:-}," == *",unet,"* ]]; then
    UNET_ARGS=(--preset "${UNET_PRESET:-$([ "$PRESET" = quick ] && echo small || echo strong)}")
    [ -n "${UNET_STEPS:-}" ] && UNET_ARGS+=(--steps "$UNET_STEPS")
    if [ -n "$UNET" ] && [ ! -f "$UNET/training_info.json" ]; then UNET_ARGS+=(--resume "$UNET"); echo "unet: resuming $UNET"; fi
    "$PYTHON" -m common.baselines --data "$DATA" --output "$OUT/unet" --max_train_samples "$MAX_TRAIN" \
      --max_val_samples "$MAX_VAL" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --seed "$SEED" "${UNET_ARGS[@]}"
    UNET=$(run_dir unet)
  else
    echo "unet: finished earlier in $UNET (RERUN=unet to run it again)"
  fi
  BASELINE_ARGS=(--baselines frangi,unet,grid --unet "$UNET" --max_train_samples "$MAX_TRAIN")
fi

if wants eval; then
  banner "evaluation: every stage side by side"
  CKPTS=(base)
  for pair in "sft=$SFT" "dpo=$DPO" "hard=$HARD" "ppo=$PPO"; do
    [ -f "${pair#*=}/stage.json" ] && CKPTS+=("$pair")
  done
  "$PYTHON" evaluate.py --model "$MODEL" --data "$DATA" --max_val_samples "$MAX_VAL" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} \
    --seed "$SEED" --checkpoints "${CKPTS[@]}" --output "$OUT/eval" --panel 4 --overlays 2 \
    ${BASELINE_ARGS[@]+"${BASELINE_ARGS[@]}"}
fi

if wants video && [ -f "$HARD/stage.json" ] && [ "${STILL_IMAGES:-0}" = 1 ]; then
  banner "SAM2 video memory: skipped (STILL_IMAGES=1: every image is its own video, no memory to carry)"
elif wants video && [ -f "$HARD/stage.json" ]; then
  banner "SAM2 video memory: per-frame vs video mode, on all validation frames and on the temporal hard clusters"
  if [ "$("$PYTHON" -c "import json, os, sys; from common.sa2va import QWENVL, folder_family; m = sys.argv[1]
print(m == 'tiny-qwenvl' or (os.path.isfile(f'{m}/config.json') and folder_family(json.load(open(f'{m}/config.json'))) == QWENVL))" "$MODEL")" = True ]; then
    echo "video mode follows the InternVL family's released video inference: skipped for $MODEL"
  else
    # the clusters are mined on the validation split with the final model, then both modes are scored there
    [ -f "$OUT/mine_val/hard_samples.json" ] || \
      "$PYTHON" mine_hard.py "${COMMON[@]}" --data "$DATA" --init "$HARD" --split val --output "$OUT/mine_val" \
        "${MINE_ARGS[@]}"
    "$PYTHON" evaluate.py --model "$MODEL" --data "$DATA" --max_val_samples "$MAX_VAL" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --seed "$SEED" \
      --checkpoints "sft=$SFT" \
      "hard=$HARD" --video_mode --hard_clusters "$OUT/mine_val/hard_samples.json" --output "$OUT/eval_video" \
      --overlays 0 --no_cldice
  fi
fi

if wants merge && [ -f "$HARD/stage.json" ]; then
  banner "merge: fold LoRA + trained heads of the stage-3 model into a standalone checkpoint, and check it"
  "$PYTHON" merge_lora.py --base_model "$MODEL" --lora_weights "$HARD" --output_model "$OUT/merged" --overwrite
fi

banner "done in $(( $(date +%s) - START )) s"
[ -f "$OUT/eval/stage_table.md" ] && cat "$OUT/eval/stage_table.md"
if [ -f "$OUT/eval_video/stage_table.md" ]; then
  printf '\nSAM2 video memory (validation):\n'
  tail -n 4 "$OUT/eval_video/stage_table.md"
fi
echo "outputs: $OUT (eval/metrics.csv, eval/summary.json, eval/panel.png, mine/hard_samples.json, merged/)"
