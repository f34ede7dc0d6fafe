#!/usr/bin/env bash
# The command line, end to end: quantize (RTN, then GPTQ with your own calibration text), evaluate, list grids.
#   bash examples/cli_quickstart.sh [MODEL] [OUT_DIR]     (MODEL: a local folder, or `default` = embedded SmolLM2-135M)
# AFPQ may name another launcher (tests use "python -m afpq_plugins.cli").
set -euo pipefail
MODEL=${1:-default}
OUT=${2:-out/cli}
AFPQ=${AFPQ:-afpq}
$AFPQ --version
$AFPQ formats
$AFPQ quantize "$MODEL" "$OUT/rtn-nf3-g64" --method rtn --format nf3 --group-size ${GROUP:-64} --overwrite --quiet
$AFPQ eval "$OUT/rtn-nf3-g64" --seqlen ${SEQLEN:-512} --windows ${WINDOWS:-4} --quiet
# your own calibration data: a .txt, a .jsonl with a "text" field, or a datasets folder (save_to_disk)
mkdir -p "$OUT"
python -c "import json; from afpq_plugins.data import load_text, calibration_text_paths as p
open('$OUT/calib.jsonl', 'w').write(''.join(json.dumps({'text': load_text(f)[:200000]}) + '\n' for f in p()))"
$AFPQ quantize "$MODEL" "$OUT/rtn-nf3-g64-output" --method rtn --format nf3 --group-size ${GROUP:-64} \
    --scale-search output --dataset "$OUT/calib.jsonl" --nsamples ${NSAMPLES:-8} --calib-seqlen ${SEQLEN:-512} --overwrite --quiet
$AFPQ eval "$OUT/rtn-nf3-g64-output" --seqlen ${SEQLEN:-512} --windows ${WINDOWS:-4} --quiet
head -n 20 "$OUT/rtn-nf3-g64-output/README.md"   # the model card written with every checkpoint
