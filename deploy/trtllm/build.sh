#!/usr/bin/env bash
# Build LlavaGuard-v1.2-OV (LLaVA-OneVision, Qwen2) or ICM-LLaVA-v1.5-7B (LLaVA-1.5, LLaMA) for
# TensorRT-LLM and the Triton model repository that serves it as `guard` (triton_models/trtllm),
# then smoke-test it. Runs inside the pinned Triton TensorRT-LLM image, on the GPU the engines
# are for (engines run only on the GPU architecture and the TensorRT-LLM version they were built
# with). deploy/trtllm/README.md explains every step.
#
#   docker run --rm --gpus all --shm-size=2g -e HF_TOKEN \
#     -v "$PWD":/src:ro -v /srv/guard/models:/models -v /srv/guard/work:/work -w /src \
#     nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3 \
#     deploy/trtllm/build.sh --model 0.5b --schema service/schemas/answer.llavaguard-v1.2.json
#
# ICM-LLaVA-v1.5-7B is published in the original LLaVA format: convert it first
# (deploy/icm/convert_llava.py), then `build.sh --model icm-7b --hf-dir CONVERTED`.
#
# Steps, each skipped when its output exists and was made with the same settings (--force redoes
# all): download the -hf checkpoint, check its weight names and config for TensorRT-LLM's loader
# (fixing what renaming fixes), compute the engine limits from its processor, convert and
# build the LLM engine, build the vision engine, write xgrammar's tokenizer file (LlavaGuard's
# JSON answers only), fill the templates into a staging repository, copy it to --out, start
# tritonserver on it and judge one image (plus a burst, for throughput).

set -euo pipefail

readonly PINNED_IMAGE="nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"
readonly PINNED_TRTLLM="1.2.1"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
readonly REPO_ROOT
readonly HERE="${REPO_ROOT}/deploy/trtllm"

usage() {
  cat <<EOF
usage: $(basename "$0") --model 0.5b|7b --schema FILE [options]
       $(basename "$0") --model icm-7b --hf-dir CONVERTED [options]

  --model 0.5b|7b|icm-7b    AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf or -7B-OV-hf, or
                            zhaoyuzhi/ICM-LLaVA-v1.5-7B (LLaVA-1.5; needs --hf-dir)
  --schema FILE             LlavaGuard: the answer's JSON schema (python -m service schemas
                            writes it); --no-schema turns guided decoding off. Not for icm-7b,
                            whose answers are prose (Yes or No, then why)
  --out DIR                 the model repository to write (default /models); emptied first
                            only with --force
  --serve-root DIR          where the server will see --out (default: --out); engine paths in
                            the configs are absolute
  --work DIR                downloads, checkpoints, engines, staging (default /work/llavaguard)
  --hf-dir DIR              a checkpoint already on disk (no download). icm-7b: the checkpoint
                            converted to transformers' llava format, which the original one is
                            not: first run python deploy/icm/convert_llava.py --original DIR
                            --vision-tower DIR --out DIR
  --revision REV            hub revision to download (default main); pinned to its commit
  --policy FILE             policy prompt for the limits and the smoke test (default
                            service/policies/llavaguard-v1.2.toml, icm-7b: icm-assistant-v1.toml)
  --max-batch-size N        in-flight batch of the LLM engine and of guard (default 16)
  --max-image-side PX       longest image side served (default 1024, the consumer's resize)
  --max-new-tokens N        answer length the engine is built for (default 500)
  --max-num-tokens N        tokens per engine step, the chunk size of a prefill (default 16384)
  --vision-images N         images per vision-engine run (default 2)
  --kv-cache-fraction F     share of free GPU memory for the KV cache (default 0.85)
  --guard-instances N       guard BLS instances (default 2)
  --skip-smoke              do not start tritonserver
  --force                   redo every step, replace --out's contents
  --allow-trtllm VERSION    accept this TensorRT-LLM instead of ${PINNED_TRTLLM} (unsupported)
EOF
}

die() {
  echo "build.sh: $*" >&2
  exit 2
}

step() {
  echo "== $*" >&2
}

MODEL=""
SCHEMA=""
NO_SCHEMA=0
OUT=/models
SERVE_ROOT=""
WORK=/work/llavaguard
HF_DIR=""
REVISION=main
POLICY=""
MAX_BATCH_SIZE=16
MAX_IMAGE_SIDE=1024
MAX_NEW_TOKENS=500
MAX_NUM_TOKENS=16384
VISION_IMAGES=2
KV_CACHE_FRACTION=0.85
GUARD_INSTANCES=2
SMOKE=1
FORCE=0
ALLOW_TRTLLM="${PINNED_TRTLLM}"

while (($#)); do
  case "$1" in
    --model) MODEL="${2:?}"; shift 2 ;;
    --schema) SCHEMA="${2:?}"; shift 2 ;;
    --no-schema) NO_SCHEMA=1; shift ;;
    --out) OUT="${2:?}"; shift 2 ;;
    --serve-root) SERVE_ROOT="${2:?}"; shift 2 ;;
    --work) WORK="${2:?}"; shift 2 ;;
    --hf-dir) HF_DIR="${2:?}"; shift 2 ;;
    --revision) REVISION="${2:?}"; shift 2 ;;
    --policy) POLICY="${2:?}"; shift 2 ;;
    --max-batch-size) MAX_BATCH_SIZE="${2:?}"; shift 2 ;;
    --max-image-side) MAX_IMAGE_SIDE="${2:?}"; shift 2 ;;
    --max-new-tokens) MAX_NEW_TOKENS="${2:?}"; shift 2 ;;
    --max-num-tokens) MAX_NUM_TOKENS="${2:?}"; shift 2 ;;
    --vision-images) VISION_IMAGES="${2:?}"; shift 2 ;;
    --kv-cache-fraction) KV_CACHE_FRACTION="${2:?}"; shift 2 ;;
    --guard-instances) GUARD_INSTANCES="${2:?}"; shift 2 ;;
    --skip-smoke) SMOKE=0; shift ;;
    --force) FORCE=1; shift ;;
    --allow-trtllm) ALLOW_TRTLLM="${2:?}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

# Per model: the hub repository (the served model's name), the -hf model type (TensorRT-LLM's
# loader and vision builder), the tokens that end and pad an answer, the answer's format, the
# default policy.
#   LlavaGuard-v1.2-OV: LLaVA-OneVision (Qwen2, SigLIP anyres), a JSON answer constrained to the
#     schema by xgrammar, its rating token's log-prob from output_log_probs.
#   ICM-LLaVA-v1.5-7B: LLaVA-1.5 (Vicuna-7B, CLIP ViT-L/14-336: one 336-px patch, 576 tokens),
#     images padded to a square first as LLaVA-1.5 was trained; a prose answer (no grammar)
#     whose leading Yes/No is scored from the step's logits (yes_no_logits, so the engine
#     gathers generation logits); LLaMA's </s> (id 2) ends and pads.
case "${MODEL}" in
  0.5b | 7b)
    HF_REPO="AIML-TUDA/LlavaGuard-v1.2-${MODEL^^}-OV-hf"
    HF_MODEL_TYPE=llava_onevision
    TEXT_MODEL=Qwen2
    END_TOKEN='<|im_end|>'
    PAD_TOKEN='<|endoftext|>'
    YES_NO=0
    POLICY="${POLICY:-${REPO_ROOT}/service/policies/llavaguard-v1.2.toml}"
    ;;
  icm-7b)
    HF_REPO="zhaoyuzhi/ICM-LLaVA-v1.5-7B"
    HF_MODEL_TYPE=llava
    TEXT_MODEL=LLaMA
    END_TOKEN='</s>'
    PAD_TOKEN='</s>'
    YES_NO=1
    POLICY="${POLICY:-${REPO_ROOT}/service/policies/icm-assistant-v1.toml}"
    [[ -n "${HF_DIR}" ]] || die "--model icm-7b needs --hf-dir: the hub has ICM-LLaVA-v1.5-7B" \
      "in the original LLaVA format only; convert it first with python" \
      "deploy/icm/convert_llava.py --original DIR --vision-tower DIR --out DIR"
    ;;
  *) usage >&2; die "--model must be 0.5b, 7b or icm-7b" ;;
esac
if ((YES_NO)); then
  [[ -z "${SCHEMA}" ]] || die "--schema: ${HF_REPO} answers in prose (Yes or No, then why)," \
    "which no JSON schema describes; leave it out"
  SCHEMA=""
elif ((NO_SCHEMA)); then
  SCHEMA=""
elif [[ -z "${SCHEMA}" ]]; then
  die "--schema FILE is required (or --no-schema): the guard constrains answers to it"
else
  [[ -f "${SCHEMA}" ]] || die "no schema file ${SCHEMA}"
  SCHEMA="$(cd "$(dirname "${SCHEMA}")" && pwd)/$(basename "${SCHEMA}")"
fi
[[ -f "${POLICY}" ]] || die "no policy file ${POLICY}"
for number in "${MAX_BATCH_SIZE}" "${MAX_IMAGE_SIDE}" "${MAX_NEW_TOKENS}" "${MAX_NUM_TOKENS}" \
  "${VISION_IMAGES}" "${GUARD_INSTANCES}"; do
  [[ "${number}" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got ${number}"
done
[[ "${KV_CACHE_FRACTION}" =~ ^0\.[0-9]+$ ]] || die "--kv-cache-fraction must be in (0, 1)"
[[ "${OUT}" == /* && "${OUT}" != "/" ]] || die "--out must be an absolute path other than /"
SERVE_ROOT="${SERVE_ROOT:-${OUT}}"

# --- 0. the image ----------------------------------------------------------------------------
step "0/8 checking the image (pinned: ${PINNED_IMAGE}, TensorRT-LLM ${PINNED_TRTLLM})"
for tool in python3 trtllm-build tritonserver nvidia-smi; do
  command -v "${tool}" >/dev/null || die "${tool} not found: run this inside ${PINNED_IMAGE}"
done
TRTLLM_VERSION="$(python3 -c 'import tensorrt_llm; print(tensorrt_llm.__version__)' 2>/dev/null |
  tail -n 1)"
if [[ "${TRTLLM_VERSION}" != "${ALLOW_TRTLLM}" ]]; then
  die "this image has TensorRT-LLM ${TRTLLM_VERSION:-none}, the build is pinned to" \
    "${PINNED_TRTLLM} (the last line with the TensorRT engine path for these LLaVA models);" \
    "--allow-trtllm ${TRTLLM_VERSION} to try anyway"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2

BUILD_DIR="${WORK}/${MODEL}"
mkdir -p "${BUILD_DIR}"

# done_before NAME SETTINGS: true when step NAME already ran with these settings.
done_before() {
  local stamp="${BUILD_DIR}/.$1.done"
  ((FORCE == 0)) && [[ -f "${stamp}" ]] && [[ "$(cat "${stamp}")" == "$2" ]]
}
mark_done() {
  printf '%s' "$2" >"${BUILD_DIR}/.$1.done"
}

# --- 1. the checkpoint -----------------------------------------------------------------------
HUB_COMMIT=""
if [[ -n "${HF_DIR}" ]]; then
  step "1/8 using the checkpoint in ${HF_DIR}"
  [[ -f "${HF_DIR}/config.json" ]] || die "no config.json in ${HF_DIR}"
  # The kind of checkpoint, from config.json alone, before the fingerprint reads every byte: an
  # original-format LLaVA checkpoint is refused with the command that converts it.
  python3 "${HERE}/checkpoint_layout.py" --hf-dir "${HF_DIR}" --model-type "${HF_MODEL_TYPE}" \
    --config-only || die "${HF_DIR} is not a ${HF_MODEL_TYPE} checkpoint TensorRT-LLM converts (above)"
else
  HF_DIR="${BUILD_DIR}/hf"
  if done_before download "${HF_REPO}@${REVISION}"; then
    step "1/8 checkpoint ${HF_REPO}@${REVISION} already downloaded"
  else
    step "1/8 downloading ${HF_REPO}@${REVISION} (gated: needs HF_TOKEN and accepted terms)"
    python3 - "${HF_REPO}" "${REVISION}" "${HF_DIR}" <<'EOF'
import sys
from huggingface_hub import HfApi, snapshot_download

repo, revision, target = sys.argv[1:]
commit = HfApi().model_info(repo, revision=revision).sha
snapshot_download(repo, revision=commit, local_dir=target)
with open(f"{target}/.commit", "w") as f:
    f.write(commit)
EOF
    mark_done download "${HF_REPO}@${REVISION}"
  fi
  HUB_COMMIT="$(cat "${HF_DIR}/.commit")"
fi
# The version verdicts carry: the fingerprint of the checkpoint's files, computed as the HF
# engine computes it (triton_models/hf), so both engines name the same checkpoint alike.
VERSION="$(python3 "${REPO_ROOT}/triton_models/hf/guard/1/checkpoint_identity.py" "${HF_DIR}" |
  sed -n 's/^guard_model_version=//p')"
[[ -n "${VERSION}" ]] || die "could not fingerprint ${HF_DIR}"
echo "checkpoint ${HF_REPO} version ${VERSION} (hub commit ${HUB_COMMIT:-unknown})" >&2
# TensorRT-LLM's loader reads the language model under transformers' pre-4.52 weight names and
# needs text_config.architectures: check them (safetensors headers and config.json only), and
# convert from a copy that has them (links to the checkpoint's files where nothing changes).
TRTLLM_HF_DIR="${BUILD_DIR}/hf-trtllm"
if done_before layout "${VERSION}" && [[ -d "${TRTLLM_HF_DIR}" ]]; then
  step "1/8 checkpoint layout already checked"
else
  step "1/8 checking the checkpoint's weight names and config against TensorRT-LLM's loader"
  rm -rf "${TRTLLM_HF_DIR}"
  python3 "${HERE}/checkpoint_layout.py" --hf-dir "${HF_DIR}" --model-type "${HF_MODEL_TYPE}" \
    --fix "${TRTLLM_HF_DIR}" ||
    die "TensorRT-LLM cannot convert ${HF_DIR} (above); see deploy/trtllm/checkpoint_layout.py"
  mark_done layout "${VERSION}"
fi

# --- 2. the limits ---------------------------------------------------------------------------
LIMITS_FILE="${BUILD_DIR}/limits.env"
LIMITS_SETTINGS="${VERSION} ${MAX_IMAGE_SIDE} ${MAX_BATCH_SIZE} ${MAX_NEW_TOKENS} $(sha256sum <"${POLICY}")"
if done_before limits "${LIMITS_SETTINGS}"; then
  step "2/8 engine limits already computed"
else
  step "2/8 engine limits for images up to ${MAX_IMAGE_SIDE} px, batches of ${MAX_BATCH_SIZE}"
  python3 "${HERE}/limits.py" --hf-dir "${HF_DIR}" --policy "${POLICY}" \
    --max-image-side "${MAX_IMAGE_SIDE}" --max-batch-size "${MAX_BATCH_SIZE}" \
    --max-new-tokens "${MAX_NEW_TOKENS}" >"${LIMITS_FILE}" ||
    die "cannot compute the engine limits of ${HF_DIR} (above)"
  mark_done limits "${LIMITS_SETTINGS}"
fi
LIMITS="$(cat "${LIMITS_FILE}")"
# Sets MAX_IMAGE_TOKENS MAX_PATCHES PROMPT_TOKENS MAX_INPUT_LEN MAX_SEQ_LEN MAX_MULTIMODAL_LEN
# HIDDEN_SIZE PROMPT_TABLE_BYTES (KEY=integer lines, checked before eval).
if grep -qvE '^[A-Z_]+=[0-9]+$' <<<"${LIMITS}"; then
  die "unexpected output from limits.py: ${LIMITS}"
fi
eval "${LIMITS}"
echo "${LIMITS}" >&2
VISION_MAX_BATCH=$((MAX_PATCHES * VISION_IMAGES))
# Each guard instance can hold a full batch of prompt tables in the CUDA pool while they generate.
MIB=$((1 << 20))
CUDA_MEMORY_POOL_BYTES=$(((GUARD_INSTANCES * PROMPT_TABLE_BYTES + MIB - 1) / MIB * MIB))

# --- 3. the LLM checkpoint -------------------------------------------------------------------
CHECKPOINT="${BUILD_DIR}/checkpoint"
if done_before convert "${VERSION}"; then
  step "3/8 TensorRT-LLM checkpoint already converted"
else
  step "3/8 converting the language model (${TEXT_MODEL}) to a TensorRT-LLM checkpoint, float16, TP 1"
  rm -rf "${CHECKPOINT}"
  python3 "${HERE}/convert.py" llm --hf-dir "${TRTLLM_HF_DIR}" --out "${CHECKPOINT}" \
    --dtype float16 --model-type "${HF_MODEL_TYPE}"
  mark_done convert "${VERSION}"
fi

# --- 4. the LLM engine -----------------------------------------------------------------------
LLM_ENGINE="${BUILD_DIR}/engine/llm"
# A Yes/No answer's confidence is read from the deciding step's logits (the guard's
# yes_no_logits): the engine must return them, which it can only when built to gather them.
llm_flags=()
if ((YES_NO)); then
  llm_flags+=(--gather_generation_logits)
fi
LLM_SETTINGS="${VERSION} ${MAX_BATCH_SIZE} ${MAX_INPUT_LEN} ${MAX_SEQ_LEN} ${MAX_NUM_TOKENS} ${MAX_MULTIMODAL_LEN} ${llm_flags[*]}"
if done_before llm "${LLM_SETTINGS}"; then
  step "4/8 LLM engine already built"
else
  step "4/8 building the LLM engine: batch ${MAX_BATCH_SIZE}, input ${MAX_INPUT_LEN}," \
    "sequence ${MAX_SEQ_LEN}, multimodal ${MAX_MULTIMODAL_LEN} (= ${MAX_BATCH_SIZE} x ${MAX_IMAGE_TOKENS})"
  rm -rf "${LLM_ENGINE}"
  trtllm-build \
    --checkpoint_dir "${CHECKPOINT}" \
    --output_dir "${LLM_ENGINE}" \
    --gemm_plugin float16 \
    --gpt_attention_plugin float16 \
    --remove_input_padding enable \
    --kv_cache_type paged \
    --context_fmha enable \
    --use_paged_context_fmha enable \
    --max_beam_width 1 \
    --max_batch_size "${MAX_BATCH_SIZE}" \
    --max_input_len "${MAX_INPUT_LEN}" \
    --max_seq_len "${MAX_SEQ_LEN}" \
    --max_num_tokens "${MAX_NUM_TOKENS}" \
    --max_prompt_embedding_table_size "${MAX_MULTIMODAL_LEN}" \
    "${llm_flags[@]}"
  mark_done llm "${LLM_SETTINGS}"
fi

# --- 5. the vision engine --------------------------------------------------------------------
VISION_ENGINE="${BUILD_DIR}/engine/vision"
if done_before vision "${VERSION} ${VISION_MAX_BATCH}"; then
  step "5/8 vision engine already built"
else
  step "5/8 building the vision engine: up to ${VISION_MAX_BATCH} patches per run" \
    "(${VISION_IMAGES} images of up to ${MAX_PATCHES} patches)"
  rm -rf "${VISION_ENGINE}"
  python3 "${HERE}/convert.py" vision --hf-dir "${TRTLLM_HF_DIR}" --out "${VISION_ENGINE}" \
    --max-batch-size "${VISION_MAX_BATCH}" --model-type "${HF_MODEL_TYPE}"
  mark_done vision "${VERSION} ${VISION_MAX_BATCH}"
fi

# --- 6. xgrammar's tokenizer file ------------------------------------------------------------
XGRAMMAR_INFO="${BUILD_DIR}/xgrammar_tokenizer_info.json"
if ((YES_NO)); then
  # The tensorrtllm backend configures no guided decoding when guided_decoding_backend or
  # xgrammar_tokenizer_info_path is empty (model_instance_state.cc,
  # getGuidedDecodingConfigFromParams): both are filled empty below.
  step "6/8 no guided decoding (the answer is prose): no xgrammar tokenizer info"
  XGRAMMAR_INFO=""
elif done_before xgrammar "${VERSION}"; then
  step "6/8 xgrammar tokenizer info already written"
else
  step "6/8 xgrammar tokenizer info"
  python3 "${HERE}/xgrammar_tokenizer_info.py" --hf-dir "${HF_DIR}" --end-token "${END_TOKEN}" \
    "${XGRAMMAR_INFO}"
  mark_done xgrammar "${VERSION}"
fi

# --- 7. the model repository -----------------------------------------------------------------
step "7/8 filling triton_models/trtllm into ${OUT} (served from ${SERVE_ROOT})"
STAGING="${BUILD_DIR}/repository"
fill_values=(
  "engine_dir=${SERVE_ROOT}/tensorrt_llm/1"
  "guard_model_name=${HF_REPO}"
  "guard_model_version=${VERSION}"
  "max_batch_size=${MAX_BATCH_SIZE}"
  "llm_max_batch_size=${MAX_BATCH_SIZE}"
  "max_image_side=${MAX_IMAGE_SIDE}"
  "kv_cache_free_gpu_mem_fraction=${KV_CACHE_FRACTION}"
  "guard_instance_count=${GUARD_INSTANCES}"
  "vision_max_batch_size=${VISION_IMAGES}"
  "end_token=${END_TOKEN}"
  "pad_token=${PAD_TOKEN}"
)
if [[ -n "${SCHEMA}" ]]; then
  fill_values+=("guided_json_schema=@${SCHEMA}")
else
  fill_values+=("guided_json_schema=")
fi
if [[ -n "${XGRAMMAR_INFO}" ]]; then
  fill_values+=("xgrammar_tokenizer_info_path=${SERVE_ROOT}/tensorrt_llm/1/xgrammar_tokenizer_info.json")
else
  fill_values+=("xgrammar_tokenizer_info_path=" "guided_decoding_backend=")
fi
if ((YES_NO)); then
  fill_values+=("yes_no_logits=true")
fi
if [[ "${HF_MODEL_TYPE}" == llava ]]; then
  fill_values+=("pad_to_square=true")
fi
python3 "${REPO_ROOT}/triton_models/fill.py" --force "${REPO_ROOT}/triton_models/trtllm" \
  "${STAGING}" "${fill_values[@]}"
cp -a "${LLM_ENGINE}/." "${STAGING}/tensorrt_llm/1/"
if [[ -n "${XGRAMMAR_INFO}" ]]; then
  cp "${XGRAMMAR_INFO}" "${STAGING}/tensorrt_llm/1/xgrammar_tokenizer_info.json"
fi
mkdir -p "${STAGING}/vision_encoder/1/engine" "${STAGING}/guard/1/hf"
cp -a "${VISION_ENGINE}/." "${STAGING}/vision_encoder/1/engine/"
# The processor, tokenizer and config only: the weights are in the engines now.
find "${HF_DIR}" -maxdepth 1 -type f \( -name '*.json' -o -name '*.txt' -o -name '*.jinja' \
  -o -name '*.model' \) -exec cp {} "${STAGING}/guard/1/hf/" \;
if [[ -d "${HF_DIR}/video_processor" ]]; then
  cp -a "${HF_DIR}/video_processor" "${STAGING}/guard/1/hf/"
fi
python3 - "${STAGING}/build-info.json" <<EOF
import json, sys
json.dump({
    "checkpoint": "${HF_REPO}", "version": "${VERSION}", "hub_commit": "${HUB_COMMIT}",
    "model_type": "${HF_MODEL_TYPE}", "image": "${PINNED_IMAGE}",
    "tensorrt_llm": "${TRTLLM_VERSION}", "max_batch_size": ${MAX_BATCH_SIZE},
    "max_image_side": ${MAX_IMAGE_SIDE}, "max_image_tokens": ${MAX_IMAGE_TOKENS},
    "max_patches": ${MAX_PATCHES}, "prompt_tokens": ${PROMPT_TOKENS},
    "max_input_len": ${MAX_INPUT_LEN}, "max_seq_len": ${MAX_SEQ_LEN},
    "max_num_tokens": ${MAX_NUM_TOKENS}, "max_multimodal_len": ${MAX_MULTIMODAL_LEN},
    "vision_max_batch_size": ${VISION_MAX_BATCH},
    "cuda_memory_pool_bytes": ${CUDA_MEMORY_POOL_BYTES},
    "guided_json_schema": bool("${SCHEMA}"),
    "yes_no_logits": bool(${YES_NO}), "gather_generation_logits": bool(${YES_NO}),
    "pad_to_square": "${HF_MODEL_TYPE}" == "llava",
}, open(sys.argv[1], "w"), indent=2)
EOF
mkdir -p "${OUT}"
if [[ -n "$(ls -A "${OUT}")" ]]; then
  ((FORCE)) || die "${OUT} is not empty (--force replaces its contents)"
  find "${OUT}" -mindepth 1 -delete
fi
cp -a "${STAGING}/." "${OUT}/"
SERVE_COMMAND="tritonserver --model-repository=${SERVE_ROOT} --cuda-memory-pool-byte-size=0:${CUDA_MEMORY_POOL_BYTES}"
echo "serve it with: ${SERVE_COMMAND}" >&2

# --- 8. the smoke test -----------------------------------------------------------------------
if ((SMOKE == 0)); then
  step "8/8 smoke test skipped"
  exit 0
fi
[[ "${SERVE_ROOT}" == "${OUT}" ]] || die "the smoke test serves --out; give --serve-root only with --skip-smoke"
step "8/8 smoke test: tritonserver on ${OUT}, one image, then a burst"
LOG="${BUILD_DIR}/tritonserver.log"
tritonserver --model-repository="${OUT}" --http-port=8000 --grpc-port=8001 \
  --metrics-port=8002 --cuda-memory-pool-byte-size="0:${CUDA_MEMORY_POOL_BYTES}" \
  >"${LOG}" 2>&1 &
SERVER=$!
trap 'kill "${SERVER}" 2>/dev/null || true; wait "${SERVER}" 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  if python3 -c 'import urllib.request as u; u.urlopen("http://localhost:8000/v2/health/ready", timeout=2)' 2>/dev/null; then
    break
  fi
  kill -0 "${SERVER}" 2>/dev/null || { tail -n 50 "${LOG}" >&2; die "tritonserver exited (log: ${LOG})"; }
  sleep 5
done
smoke_args=(--url http://localhost:8000 --policy "${POLICY}" --max-side "${MAX_IMAGE_SIDE}"
  --max-tokens "${MAX_NEW_TOKENS}" --burst $((MAX_BATCH_SIZE * 2)) --concurrency "${MAX_BATCH_SIZE}")
if [[ -n "${SCHEMA}" ]]; then
  smoke_args+=(--schema "${SCHEMA}")
fi
if [[ -n "${SMOKE_IMAGE:-}" ]]; then
  smoke_args+=(--image "${SMOKE_IMAGE}")
fi
python3 "${HERE}/smoke_test.py" "${smoke_args[@]}" | tee "${BUILD_DIR}/smoke.json"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader >&2
echo "smoke test passed; server log: ${LOG}" >&2
