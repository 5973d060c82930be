#!/usr/bin/env bash
# The whole UniMM loop on the embedded shapes data, on CPU:
#   1. shapes images, captions and questions + a tiny random Qwen2 (hidden 256, 4 layers) with its own BPE tokenizer
#   2. a tiny visual tokenizer (DualToken; `--tokenizer vqrae` for VQRAE)
#   3. the tokenizer checked with the pixel checker, and the code caches (scripts/pretokenize.py), at once
#   4. joint text-to-image + caption pretraining, DeepSpeed ZeRO-2 on two gloo ranks on CPU (launched by `torchrun`)
#   5. LoRA instruction tuning on shape questions (the same)
#   6. three lanes at once: the guidance scale (DualToken: the recipe's, 1, chosen on development seeds 5-8; VQRAE:
#      chosen on a validation split of the seen captions, never on the held-out ones), images for the prompts at
#      that scale (scripts/generate_t2i.py) and their generation accuracy (the pixel checker confirms colour, shape
#      and position) on the captions seen in training and, apart, on the held-out captions never trained on;
#      answers to held-out questions (scripts/chat.py) and their QA accuracy (exact match); the held-out accuracy
#      at guidance scales 1 (none), 1.25, 1.5, 2 and 3, greedy and sampled (a report, not a choice)
#   7. a table of each figure against its target
#
#   bash scripts/quickstart.sh                 # full run: 24 of the 72 captions held out, 6 of the seen ones
#                                              # the validation split (targets: held-out generation >= 0.8,
#                                              # seen >= 0.9, QA >= 0.9, <= 15 min on 2 cores)
#   bash scripts/quickstart.sh --seed 1        # another seed: data, held-out captions, every training stage
#   bash scripts/quickstart.sh --fast          # a few steps of everything (CI); accuracies are not meaningful
#   bash scripts/quickstart.sh --tokenizer vqrae --out runs/qs_vqrae
#   bash scripts/quickstart.sh --held_out 0 --validation 0   # every caption is also trained on
#   bash scripts/quickstart.sh --scenes 0.5    # + two-shape training images (measured worse: results file)
#   bash scripts/quickstart.sh --guidance validation   # choose the guidance scale on the validation captions
#                                              # (--guidance 2: that scale; default 1 for DualToken, validation
#                                              # for VQRAE)
#   UNIMM_DEPS=latest bash scripts/quickstart.sh   # on the newest releases (.venv-latest) instead of the lock
# Environment: QUICKSTART_OUT (run directory), QUICKSTART_FAST=1 (same as --fast), QUICKSTART_MASTER_PORT,
# QUICKSTART_RERANK=N (DualToken: each image the best of the greedy one and N sampled ones, generate_t2i.py
# --rerank_samples; default 0), UNIMM_DEPS (locked | latest: see scripts/_venv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${QUICKSTART_OUT:-runs/quickstart}"
FAST="${QUICKSTART_FAST:-0}"
TOKENIZER=dualtoken
HELD_OUT=24
VALIDATION=6
SEED=0
SCENES=0
GUIDANCE=""
PORT="${QUICKSTART_MASTER_PORT:-29650}"
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) FAST=1 ;;
    --tokenizer) TOKENIZER="$2"; shift ;;
    --tokenizer=*) TOKENIZER="${1#*=}" ;;
    --out) OUT="$2"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --held_out) HELD_OUT="$2"; shift ;;
    --held_out=*) HELD_OUT="${1#*=}" ;;
    --validation) VALIDATION="$2"; shift ;;
    --validation=*) VALIDATION="${1#*=}" ;;
    --seed) SEED="$2"; shift ;;
    --seed=*) SEED="${1#*=}" ;;
    --scenes) SCENES="$2"; shift ;;
    --scenes=*) SCENES="${1#*=}" ;;
    --guidance) GUIDANCE="$2"; shift ;;
    --guidance=*) GUIDANCE="${1#*=}" ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$TOKENIZER" in
  dualtoken|vqrae) ;;
  *) echo "--tokenizer must be dualtoken or vqrae, got $TOKENIZER" >&2; exit 2 ;;
esac

# VQRAE understands images through its continuous features (encode_features -> the LLM's feature projector) and
# generates through its SimVQ codes: pretraining reads the captions as one-turn conversations from pixels and
# text-to-image from the code cache, finetuning the questions from pixels, so no conversation code cache is built.
# DualToken reads both from code caches.
case "$TOKENIZER" in
  dualtoken)
    PREPARE_ARGS=(); PRETRAIN_CFG=configs/quickstart/pretrain.yaml; FINETUNE_CFG=configs/quickstart/finetune.yaml
    PRETRAIN_DATA=(); FINETUNE_IMAGES=(--conversation_code_cache "$OUT/code_cache_llava")
    # No guidance: on development seeds 5-8 (never reported as the test) scale 1 drew 86 of 96 held-out captions,
    # choosing on the validation captions 82 (they are seen captions: every scale draws them, so the choice is noise;
    # benchmarks/results/quickstart.md).
    GUIDANCE_DEFAULT=1
    # Greedy, not reranked: the best of the greedy image and 8 sampled ones by the model's own caption + image NLL
    # (generate_t2i.py --rerank_samples 8), chosen on pretrained development models (117 of 120 held-out captions
    # against greedy's 107), drew 104 against greedy's 106 on the finetuned models of seeds 0-4 and 40-42 seen
    # captions against 42; on a finetuned development model its caption NLL no longer tells right images from wrong
    # (2.45 against 2.51 nats), the conversation finetuning having flattened it (benchmarks/results/quickstart.md,
    # 2026-12-08). QUICKSTART_RERANK=8 turns it on.
    RERANK="${QUICKSTART_RERANK:-0}" ;;
  vqrae)
    PREPARE_ARGS=(--caption_conversations true)
    PRETRAIN_CFG=configs/quickstart/pretrain_vqrae.yaml; FINETUNE_CFG=configs/quickstart/finetune_vqrae.yaml
    PRETRAIN_DATA=(--conversation_json "$OUT/data/train/captions_llava.json"); FINETUNE_IMAGES=()
    GUIDANCE_DEFAULT=validation  # its recorded five seeds (benchmarks/results/quickstart_vqrae.md)
    RERANK=0 ;;  # reranking reads candidates as codes; VQRAE's LLM reads images as continuous features
esac
GUIDANCE="${GUIDANCE:-$GUIDANCE_DEFAULT}"
if [ "$GUIDANCE" = validation ]; then
  GUIDANCE_ARGS=()
elif [[ "$GUIDANCE" =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v g="$GUIDANCE" 'BEGIN { exit !(g >= 1) }'; then
  GUIDANCE_ARGS=(--scale "$GUIDANCE")
else
  echo "--guidance must be validation or a scale of 1 (no guidance) or more, got $GUIDANCE" >&2; exit 2
fi

source scripts/_venv.sh
export OMP_NUM_THREADS=1  # two ranks share the cores during DeepSpeed stages; set per stage below otherwise
CORES="$(nproc)"

if [ "$FAST" = "1" ]; then
  TRAIN_SAMPLES=256; TEST_SAMPLES=12; NUM_PROMPTS=8
  TOK_STEPS=100; PRE_STEPS=12; FT_STEPS=8; LOG_STEPS=4; CFG_SAMPLES=1
else
  TRAIN_SAMPLES=2048; TEST_SAMPLES=72; NUM_PROMPTS=72
  TOK_STEPS=""; PRE_STEPS=""; FT_STEPS=""; LOG_STEPS=""; CFG_SAMPLES=4
fi
# Decoding of stage 6: greedy, at the recipe's guidance scale or the one chosen on the validation captions (scale 1,
# none, without them); with RERANK > 0 (DualToken) each image then the best of that and RERANK sampled ones (top-k 8,
# temperature 1).
GEN_TEMPERATURE=0; GEN_TOP_K=8
steps() {  # --max_steps override only in fast mode (the YAML recipes hold the full-run values)
  if [ -n "$1" ]; then echo "--max_steps $1 --logging_steps $LOG_STEPS"; fi
}

START=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
# Steps that do not need each other's results run at once (scripts/_jobs.sh), one thread each, their output printed in
# a fixed order when they end: on 2 cores this takes most of the Python start-up and single-threaded scoring off the
# clock. One thread or two draw the same codes, images and answers (byte for byte: benchmarks/results/quickstart.md).
JOBS_LOG_DIR="$OUT/logs"
source scripts/_jobs.sh

# A rerun starts over (the trainers would otherwise resume from old checkpoints in these folders).
for sub in data llm tokenizer code_cache code_cache_llava pretrain finetune generated; do rm -rf "${OUT:?}/$sub"; done
rm -rf "$OUT/logs"
rm -f "$OUT/scores.json" "$OUT/scores.json.lock" "$OUT/answers.json" "$OUT/answers.txt" "$OUT/guidance_scale"
mkdir -p "$OUT/logs"

stage "1/7 shapes data and a tiny Qwen2 -> $OUT/data, $OUT/llm"
python scripts/quickstart_eval.py prepare --out "$OUT" --seed "$SEED" --train_samples "$TRAIN_SAMPLES" \
  --test_samples "$TEST_SAMPLES" --num_prompts "$NUM_PROMPTS" --held_out_prompts "$HELD_OUT" --scenes "$SCENES" \
  --validation_prompts "$VALIDATION" \
  "${PREPARE_ARGS[@]}"

stage "2/7 visual tokenizer ($TOKENIZER) -> $OUT/tokenizer"
OMP_NUM_THREADS="$CORES" python scripts/train_tokenizer.py "configs/quickstart/tokenizer_${TOKENIZER}.yaml" \
  --dataset "$OUT/data/train/captions.jsonl" --output_dir "$OUT/tokenizer" --seed "$SEED" $(steps "$TOK_STEPS")
TOK="$OUT/tokenizer/model"

if [ "$TOKENIZER" = dualtoken ]; then CACHES="$OUT/code_cache, $OUT/code_cache_llava"; else CACHES="$OUT/code_cache"; fi
stage "3/7 tokenizer check and code caches -> $CACHES (at once, one thread each)"
background tokenizer_check python scripts/quickstart_eval.py tokenizer --out "$OUT" --seed "$SEED" \
  --visual_tokenizer_path "$TOK" --test_samples "$TEST_SAMPLES"
background code_cache python scripts/pretokenize.py --data "$OUT/data/train/captions.jsonl" \
  --visual_tokenizer_path "$TOK" --output_dir "$OUT/code_cache" --num_workers 0
CACHE_JOBS=(code_cache)
if [ "$TOKENIZER" = dualtoken ]; then
  background code_cache_llava python scripts/pretokenize.py --data "$OUT/data/train/llava.json" --data_format llava \
    --visual_tokenizer_path "$TOK" --output_dir "$OUT/code_cache_llava" --num_workers 0
  CACHE_JOBS+=(code_cache_llava)
fi
await tokenizer_check "${CACHE_JOBS[@]}"

# The two ranks are started by torchrun rather than the `deepspeed` launcher: the same ranks, the same ZeRO-2 engine
# and byte-identical weights, without the runner and launcher processes that import DeepSpeed first (~5 s a stage).
stage "4/7 pretraining (text-to-image + captions$([ "$TOKENIZER" = vqrae ] && echo " from pixels")), DeepSpeed ZeRO-2 on 2 CPU ranks -> $OUT/pretrain"
torchrun --nproc_per_node 2 --master_port "$PORT" scripts/pretrain.py --deepspeed configs/deepspeed/zero2.json \
  "$PRETRAIN_CFG" --llm_path "$OUT/llm" --visual_tokenizer_path "$TOK" --code_cache "$OUT/code_cache" \
  "${PRETRAIN_DATA[@]}" --output_dir "$OUT/pretrain" --seed "$SEED" $(steps "$PRE_STEPS")

stage "5/7 LoRA finetuning on shape questions, DeepSpeed ZeRO-2 on 2 CPU ranks -> $OUT/finetune"
torchrun --nproc_per_node 2 --master_port "$((PORT + 1))" scripts/finetune.py --deepspeed configs/deepspeed/zero2.json \
  "$FINETUNE_CFG" --model_path "$OUT/pretrain" --visual_tokenizer_path "$TOK" \
  --conversation_json "$OUT/data/train/llava.json" "${FINETUNE_IMAGES[@]}" \
  --code_cache "$OUT/code_cache" --output_dir "$OUT/finetune" --seed "$SEED" $(steps "$FT_STEPS")

# Stage 6 in three lanes at once: the guidance scale (the recipe's, or chosen on the validation captions), the
# images at that scale and their scores; the answers to the held-out questions and their score; the held-out
# accuracy by guidance scale (a report, not a choice).
images_lane() {
  python scripts/quickstart_eval.py guidance --out "$OUT" --seed "$SEED" \
    --model_path "$OUT/finetune" --visual_tokenizer_path "$TOK" --scales 1 1.5 2 3 --samples "$CFG_SAMPLES" \
    --top_k "$GEN_TOP_K" "${GUIDANCE_ARGS[@]}"
  local scale
  scale="$(cat "$OUT/guidance_scale")"
  echo "generating greedily at guidance scale $scale$([ "$RERANK" -gt 0 ] && echo ", each image then the best of it and $RERANK sampled ones")"
  python scripts/generate_t2i.py --model_path "$OUT/finetune" --visual_tokenizer_path "$TOK" \
    --prompts_file "$OUT/data/prompts.txt" --output_dir "$OUT/generated" --cfg_scale "$scale" \
    --temperature "$GEN_TEMPERATURE" --top_k "$GEN_TOP_K" --batch_size 36 --seed "$SEED" --rerank_samples "$RERANK"
  python scripts/quickstart_eval.py generation --out "$OUT" --generated_dir "$OUT/generated"
}
answers_lane() {
  python scripts/chat.py "$OUT/data/test/qa.yaml" --model_path "$OUT/finetune" \
    --visual_tokenizer_path "$TOK" --max_new_tokens 8 --seed "$SEED" --output_json "$OUT/answers.json" > "$OUT/answers.txt"
  python scripts/quickstart_eval.py qa --out "$OUT" --answers_json "$OUT/answers.json"
}
stage "6/7 guidance scale ($([ "$GUIDANCE" = validation ] && echo "validation captions" || echo "fixed, $GUIDANCE")), generation, question answering and the guidance table with $OUT/finetune (at once, one thread each)"
background images images_lane
background answers answers_lane
background guidance_table python scripts/quickstart_eval.py cfg --out "$OUT" --seed "$SEED" \
  --model_path "$OUT/finetune" --visual_tokenizer_path "$TOK" --scales 1 1.25 1.5 2 3 --samples "$CFG_SAMPLES" \
  --top_k "$GEN_TOP_K"
await images answers guidance_table

stage "7/7 scores"
echo "scores: $OUT/scores.json; generated images: $OUT/generated (grid.png); answers: $OUT/answers.json"
echo "open them in UniMM Studio: bash scripts/demo.sh --run_dir $OUT"
ELAPSED=$(( $(date +%s) - START ))
echo "quickstart finished in ${ELAPSED}s"
python scripts/quickstart_eval.py judge --out "$OUT" --tokenizer "$TOKENIZER" --elapsed "$ELAPSED"
