#!/usr/bin/env bash
# The GPU checks and benchmarks behind the README's "Performance" and "Supported checkpoints"
# sections, in phases that each fit one session on a lent machine:
#
#   bash tests/perf/run_gpu.sh parity   # released-class tiny model: predict_forward parity, SFT, merge
#   bash tests/perf/run_gpu.sh single   # 1B/4B shapes on one GPU: SFT step MFU, inference, cached hard epoch
#   bash tests/perf/run_gpu.sh multi    # 4B shape on 1 and all visible GPUs (ZeRO-2), cached hard epoch
#   bash tests/perf/run_gpu.sh cached   # 4B SFT step as from epoch 2 (frozen encoders served by the cache)
#   bash tests/perf/run_gpu.sh qwenvl   # released Qwen-VL-family class: parity and an SFT step
#   bash tests/perf/run_gpu.sh big      # 26B shape on one GPU (needs ~80+ GiB: H200)
#   bash tests/perf/run_gpu.sh video    # SAM2 video memory: parity with the released video inference, frames/s
#   bash tests/perf/run_gpu.sh engine   # 4B SFT step: torch engine (fused AdamW, --compile) vs DeepSpeed ZeRO 0/2
#
# Needs the released Sa2VA InternVL-family HF code in $SA2VA_CODE (not part of this repository)
# and deepspeed. Results (JSON lines, logs) go to $RESULTS. Each step has its own time limit,
# so one slow step does not take the others down with it.
set -uo pipefail
cd "$(dirname "$0")/../.."
PHASE=${1:?phase: parity | single | multi | cached | qwenvl | big | video | engine}
SA2VA_CODE=${SA2VA_CODE:-.sa2va_code}
RESULTS=${RESULTS:-perf_results}
WORK=${WORK:-/tmp/sa2va_perf}
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
mkdir -p "$RESULTS" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee -a "$RESULTS/log_$PHASE.txt" | tail -n 12
  echo "=== $name: exit ${PIPESTATUS[0]}"
}
build() {  # build SHAPE: a released-class folder at that shape, random weights
  [ -d "$WORK/m_$1" ] || step "build_$1" 300 python tests/real/build_released_tiny.py --sa2va_code "$SA2VA_CODE" \
    --shape "$1" --device cuda --out "$WORK/m_$1"
}
sft() {  # sft NAME GPUS ARGS...: one bench_sft configuration
  local name=$1 gpus=$2; shift 2
  step "sft_$name" 240 deepspeed --num_gpus "$gpus" tests/perf/bench_sft.py --bf16 --output "$RESULTS/sft.jsonl" "$@"
}

case $PHASE in
parity)
  build tiny
  step parity 200 python tests/real/check_parity.py --model "$WORK/m_tiny" --out "$RESULTS/parity.json"
  [ -d "$WORK/synth" ] || python -m common.synth --out "$WORK/synth" --videos 4 --frames 6 --size 256
  step sft_released_tiny 200 python train_sft.py --model "$WORK/m_tiny" --data "$WORK/synth" --epochs 2 \
    --batch_size 4 --lr 1e-3 --lora_preset small --bf16 --num_workers 2 --output "$WORK/runs"
  best=$(ls -d "$WORK"/runs/sft_*/best | tail -n 1)
  step merge 200 python merge_lora.py --base_model "$WORK/m_tiny" --lora_weights "$best" \
    --output_model "$WORK/merged" --device cuda --overwrite
  step merge_parity 200 python tests/real/check_parity.py --model "$WORK/m_tiny" --lora_weights "$best" \
    --merged "$WORK/merged" --skip_parity --skip_step --out "$RESULTS/merge.json"
  ;;
single)
  build 1b
  step infer_1b 240 python tests/perf/bench_infer.py --model "$WORK/m_1b" --bf16 --frames 64 --batch_size 16 \
    --output "$RESULTS/infer.jsonl"
  step hard_cache_1b 300 python tests/perf/bench_hard_cache.py --model "$WORK/m_1b" --bf16 --samples 128 \
    --batch_size 16 --epochs 2 --feature_cache_gb 40 --num_workers 4 --output "$RESULTS/hard_cache_1b.json"
  sft 1b_b16 1 --model "$WORK/m_1b" --batch_size 16
  build 4b
  sft 4b_b16 1 --model "$WORK/m_4b" --batch_size 16
  sft 4b_b16_ckpt 1 --model "$WORK/m_4b" --batch_size 16 --grad_ckpt
  sft 4b_b32_ckpt 1 --model "$WORK/m_4b" --batch_size 32 --grad_ckpt
  ;;
cached)  # an SFT step from epoch 2 on: the frozen encoders' outputs come from the FeatureCache
  build 4b
  sft 4b_b16_cached 1 --model "$WORK/m_4b" --batch_size 16 --feature_cache_gb 40
  sft 4b_b32_ckpt_cached 1 --model "$WORK/m_4b" --batch_size 32 --grad_ckpt --feature_cache_gb 40
  ;;
qwenvl)  # the released Qwen-VL-family class at a tiny config (code in $SA2VA_CODE_QWEN)
  step qwenvl 300 python tests/real/check_qwenvl_released.py --sa2va_code "${SA2VA_CODE_QWEN:-.sa2va_code_qwen}" \
    --out "$RESULTS/qwenvl_check.json"
  ;;
multi)
  build 4b
  sft 4b_x1_zero2 1 --model "$WORK/m_4b" --batch_size 16 --zero_stage 2
  sft "4b_x${NUM_GPUS}_zero2" "$NUM_GPUS" --model "$WORK/m_4b" --batch_size 16 --zero_stage 2
  step hard_cache_4b 300 python tests/perf/bench_hard_cache.py --model "$WORK/m_4b" --bf16 --samples 128 \
    --batch_size 16 --epochs 2 --feature_cache_gb 40 --num_workers 4 --output "$RESULTS/hard_cache_4b.json"
  step infer_4b 240 python tests/perf/bench_infer.py --model "$WORK/m_4b" --bf16 --frames 64 --batch_size 16 \
    --output "$RESULTS/infer.jsonl"
  ;;
big)
  build tiny
  step parity 200 python tests/real/check_parity.py --model "$WORK/m_tiny" --skip_step --out "$RESULTS/parity.json"
  build 26b
  sft 26b_b4_ckpt 1 --model "$WORK/m_26b" --batch_size 4 --grad_ckpt
  sft 26b_b8_ckpt 1 --model "$WORK/m_26b" --batch_size 8 --grad_ckpt
  ;;
video)  # released-class tiny (taught [SEG]): masks vs predict_forward(video=); 1B shape: frames/s at release sizes
  build tiny
  step video_tiny 240 python tests/perf/bench_infer.py --model "$WORK/m_tiny" --bf16 --frames 32 --batch_size 8 \
    --video_mode --output "$RESULTS/infer_video.jsonl"
  build 1b
  step video_1b 300 python tests/perf/bench_infer.py --model "$WORK/m_1b" --bf16 --frames 32 --batch_size 8 \
    --video_mode --output "$RESULTS/infer_video.jsonl"
  ;;
engine)  # the README's "LLM step made fast" table: engines, dropout, batch, --compile (4B shape, one GPU)
  build 4b
  torch_sft() {  # torch_sft NAME ARGS...: bench_sft under plain python = train_sft.py's torch engine
    local name=$1; shift
    step "sft_4b_torch_$name" 300 python tests/perf/bench_sft.py --bf16 --model "$WORK/m_4b" --output "$RESULTS/sft.jsonl" "$@"
  }
  sft 4b_b16_cached_zero2 1 --model "$WORK/m_4b" --batch_size 16 --feature_cache_gb 40 --zero_stage 2
  sft 4b_b16_cached_zero0 1 --model "$WORK/m_4b" --batch_size 16 --feature_cache_gb 40 --zero_stage 0
  torch_sft b16_cached --batch_size 16 --feature_cache_gb 40
  torch_sft b32_cached_nodrop --batch_size 32 --feature_cache_gb 60 --lora_dropout 0
  torch_sft b48_cached_nodrop --batch_size 48 --feature_cache_gb 60 --lora_dropout 0
  torch_sft b32_cached_compile --batch_size 32 --feature_cache_gb 60 --lora_dropout 0 --compile --warmup 3
  torch_sft b48_cached_compile --batch_size 48 --feature_cache_gb 60 --lora_dropout 0 --compile --warmup 3
  torch_sft b16 --batch_size 16
  torch_sft b32_compile --batch_size 32 --lora_dropout 0 --compile --warmup 3
  torch_sft b32_cached_profile --batch_size 32 --feature_cache_gb 60 --lora_dropout 0 --profile
  ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
