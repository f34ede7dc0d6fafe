#!/usr/bin/env bash
# lm-eval-harness on an AFPQ checkpoint (modern venv: lm-eval 0.4.13). No import of ours is needed:
# the installed package registers quant_method "afpq" with transformers at interpreter start.
#   bash examples/lm_eval_quickstart.sh CHECKPOINT [SEQLEN] [CHARS] [more lm_eval options, e.g. --output_path DIR]
# Task afpq_pride_ppl: perplexity over Pride and Prejudice, offline (the text ships in the package).
set -euo pipefail
CKPT=$1
SEQLEN=${2:-1024}
CHARS=${3:-0}   # 0 = the whole novel; e.g. 20000 for a quick run
TASKS=$(python -m afpq_plugins.lm_eval_tasks)
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lm_eval --model hf \
    --model_args "pretrained=$CKPT,max_length=$SEQLEN" --tasks afpq_pride_ppl --include_path "$TASKS" \
    --metadata "{\"chars\": $CHARS}" --batch_size 1 "${@:4}"
