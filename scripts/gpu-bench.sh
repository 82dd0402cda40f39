#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, after scripts/gpu-prepare.sh here:
# dragonedit's bench (f32 and f16) and the PyTorch baseline on the same card, one after the
# other, each under its own time limit so a slow row still leaves the others. Writes every
# table and log under $OUT and prints the tables last. docs/BENCHMARKS.md says how to read them.
#
# To try it on a machine without a GPU (small shapes, CPU):
#   OUT=/tmp/gb PASS_ARGS="--cpu --tiny --resolution 64 --steps 2 --runs 1" EDIT_ARGS="$PASS_ARGS" \
#   TORCH_ARGS="--tiny --device cpu --resolution 64 --steps 2 --runs 1" scripts/gpu-bench.sh
set -uo pipefail
OUT="${OUT:?set OUT to the folder for results}"
mkdir -p "$OUT"
BIN="${BIN:-/tmp/dragonedit}"
PASS_ARGS="${PASS_ARGS:---runs 5}"
EDIT_ARGS="${EDIT_ARGS:---runs 1}"
TORCH_ARGS="${TORCH_ARGS:---runs 3}"

if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  export VK_DRIVER_FILES="${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}"
fi
if [ -f .bench/dragonedit.xz ]; then
  xz -dc .bench/dragonedit.xz > "$BIN" && chmod +x "$BIN"
fi
if ls .bench/diffusers-*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install --quiet --no-deps --target /tmp/pylib .bench/diffusers-*.whl
  export PYTHONPATH="/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; date -u; } > "$OUT/machine.txt"

step() { # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

# shellcheck disable=SC2086 # the argument strings are word lists on purpose
{
  # The limits add up to 570 s, under one device call's 600.
  step ours-f32-passes 90 "$BIN" bench $PASS_ARGS --skip-edits
  step ours-f16-passes 90 "$BIN" bench $PASS_ARGS --skip-edits --f16
  step torch-fp16 90 python3 tests/reference/bench_torch.py $TORCH_ARGS --dtype fp16 --json "$OUT/torch-fp16.json"
  step torch-fp32 60 python3 tests/reference/bench_torch.py $TORCH_ARGS --dtype fp32 --skip-edits --json "$OUT/torch-fp32.json"
  step ours-f16-edits 240 "$BIN" bench $EDIT_ARGS --f16
}
for f in "$OUT"/machine.txt "$OUT"/*.md; do echo; echo "### $(basename "$f")"; cat "$f"; done
