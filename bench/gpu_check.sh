#!/usr/bin/env bash
# romeflow on a CUDA GPU in bfloat16: convert the default model, compute statistics, apply an edit,
# evaluate it and export it (merged and as a PEFT adapter), printing the time of each step.
#
#   bench/gpu_check.sh                 # from anywhere; uses `python` (or $PYTHON), the repository's params.yaml
#   DEVICE=cuda:1 DTYPE=float16 bench/gpu_check.sh
#   DEVICE=cpu DRY_RUN=1 TOKENS=8000 bench/gpu_check.sh   # the same commands on the CPU (checks the script;
#                                                          C needs more tokens than d_in = 2048)
#
# Everything is written under a temporary folder (removed at the end; KEEP=1 keeps it), with its own
# $ROMEFLOW_CACHE unless one is set (then the conversion and statistics may come from that cache).
# Exits 2, with one line, when there is no CUDA device.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MANIFEST=${MANIFEST:-edits/curie.yaml}

if [ "${DRY_RUN:-0}" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False; torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 2
fi

WORK=$(mktemp -d -t romeflow-gpu-check.XXXXXX)
if [ "${KEEP:-0}" = 1 ]; then echo "gpu_check: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
export ROMEFLOW_CACHE=${ROMEFLOW_CACHE:-$WORK/cache}
RF=("$PY" -m romeflow.cli --device "$DEVICE" --dtype "$DTYPE")

[ "${DRY_RUN:-0}" = 1 ] || "$PY" - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}")
EOF

TIMES=()
step() {  # step NAME COMMAND...: run it, keep its time
    local name=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    echo "== $name: $*" >&2
    "$@"
    t1=$(date +%s.%N)
    TIMES+=("$(awk -v n="$name" -v a="$t0" -v b="$t1" 'BEGIN { printf "%-12s %8.1f s", n, b - a }')")
}

# 1. conversion of the embedded GGUF (CPU, once per cache), then a load on the GPU
step convert "$PY" -c "from romeflow.engine.models import Placement, load_model; load_model('gemma-3-270m', log=print, placement=Placement('$DEVICE', '$DTYPE'))"
# 2. statistics of the edit layer (params.yaml stats:), on the GPU in $DTYPE (accumulated in float32)
step stats "${RF[@]}" stats --out "$WORK/stats.safetensors" ${TOKENS:+--tokens "$TOKENS"}
# 3. the edit
step apply "${RF[@]}" apply "$MANIFEST" --stats "$WORK/stats.safetensors" --out "$WORK/delta.safetensors"
# 4. its scores before and after
step eval "${RF[@]}" eval "$MANIFEST" --delta "$WORK/delta.safetensors" --out "$WORK/report.json"
# 5. exports
step export "${RF[@]}" export "$WORK/merged" --delta "$WORK/delta.safetensors"
step export-peft "${RF[@]}" export --format peft "$WORK/adapter" --delta "$WORK/delta.safetensors"

"$PY" - "$WORK/report.json" "$WORK/delta.safetensors" <<'EOF'
import json, sys
from romeflow.pipeline.deltas import load_delta
report, delta = json.load(open(sys.argv[1])), load_delta(sys.argv[2])
post = report["post"]
print("gpu_check: post-edit " + ", ".join(f"{k} {post[k]:.1f}" for k in ("ES", "PS", "NS", "S") if k in post)
      + f"; delta dtype {delta.meta.get('dtype', 'float32')}")
EOF
echo "gpu_check: timings ($DTYPE on $DEVICE)"
printf '  %s\n' "${TIMES[@]}"
