#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, after scripts/gpu-prepare.sh here:
# dragonedit's bench (f32 and f16) and the PyTorch baseline on the same card, one after the
# other, each under its own time limit so a slow row still leaves the others. Writes every
# table and log into $OUT/gpu-bench.tgz and prints the tables last. docs/BENCHMARKS.md says how to read them.
#
# To try it on a machine without a GPU (small shapes, CPU):
#   OUT=/tmp/gb PASS_ARGS="--cpu --tiny --resolution 64 --steps 2 --runs 1" EDIT_ARGS="" \
#   TORCH_ARGS="--tiny --device cpu --resolution 64 --steps 2 --runs 1" scripts/gpu-bench.sh
set -uo pipefail
OUT="${OUT:?set OUT to the folder for results}"
mkdir -p "$OUT"
# BIN names a dragonedit binary to use; without it, the one gpu-prepare.sh packed is unpacked.
BIN="${BIN:-}"
PASS_ARGS="${PASS_ARGS:---runs 3}"
EDIT_ARGS="${EDIT_ARGS:---edit-runs 1 --edit-warmups 0}"
TORCH_ARGS="${TORCH_ARGS:---runs 3}"
# The whole script's seconds (the device call's limit less a margin): each step's limit is cut
# to what is left, so the results are always packed before the call ends.
DEADLINE="${DEADLINE:-580}"

if ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  export VK_DRIVER_FILES="${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}"
fi
if [ -z "$BIN" ]; then
  BIN=/tmp/dragonedit
  xz -dc .bench/dragonedit.xz > "$BIN" && chmod +x "$BIN"
fi
# The `spirv` build (kernels in SPIR-V, matrix cores where the driver offers them), for the
# ours-spirv steps; BIN_SPIRV names another.
BIN_SPIRV="${BIN_SPIRV:-}"
if [ -z "$BIN_SPIRV" ] && [ -f .bench/dragonedit-spirv.xz ]; then
  BIN_SPIRV=/tmp/dragonedit-spirv
  xz -dc .bench/dragonedit-spirv.xz > "$BIN_SPIRV" && chmod +x "$BIN_SPIRV"
fi
if ls .bench/diffusers-*.whl >/dev/null 2>&1 && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install --quiet --no-deps --target /tmp/pylib .bench/diffusers-*.whl
  export PYTHONPATH="/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
# cubecl keeps its autotune choices in target/environment under the repository root. One
# call's choices, brought back as autotune-cache.tgz and put into .bench/, spare the next call
# most of its tuning (the machines differ, the card and driver do not).
if [ -f .bench/autotune-cache.tgz ]; then
  mkdir -p target && tar -C target -xzf .bench/autotune-cache.tgz
fi
# The NVIDIA driver keeps the machine code it compiled our shaders to under ~/.cache/nvidia:
# the second process of call 4 made its model in 25 s against the first's 41. Every H200 call
# so far had the same driver, so one call's cache, brought back as nv-cache.tgz, spares the next.
if [ -f .bench/nv-cache.tgz ]; then
  mkdir -p "$HOME/.cache" && tar -C "$HOME/.cache" -xzf .bench/nv-cache.tgz
fi
RES="$(mktemp -d)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"; date -u; } > "$RES/machine.txt"

step() { # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 15))
  if [ "$left" -lt 20 ]; then
    echo "$name: skipped, ${left} s left before the deadline" | tee -a "$RES/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS smi=""
  # The driver's view of the card's memory (every process, wgpu's own overhead included), every
  # 200 ms: the pool columns of `bench` count only burn's pool.
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$RES/$name.smi" 2>/dev/null &
    smi=$!
  fi
  timeout "$limit" "$@" > "$RES/$name.md" 2> "$RES/$name.log"
  local rc=$?
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  local peak
  peak=$(sort -n "$RES/$name.smi" 2>/dev/null | tail -1)
  echo "$name: exit $rc after $((SECONDS - start)) s, card memory peak ${peak:-n/a} MiB" | tee -a "$RES/steps.txt"
}

# The default steps' limits add up to 550 s, under one device call's 600. Each bench prints its
# rows as they finish, so a step stopped by its limit keeps the rows it had. The edits run in
# the first process, after the rows that compile and autotune their kernels, so they need no
# warm-up. The first H200 calls (docs/BENCHMARKS.md) spent most of each step compiling and
# tuning: the f16 step gets most of the time, and the rows measured there already (burn's
# conv2d in the UNet) or least needed (the tape guidance, slow to compile) are steps of their own.
# Step recomputation's guidance row is left out (call 1 measured it; on the CPU the lean default
# does a third less work in not much more memory), so that the whole edits get the time.
# STEPS picks steps by name: the default, or any of ours-f16-edit (drag and second edit only),
# ours-f16-direct, ours-f16-tape, ours-f16-browser-pools (the move edit with the browser's
# one-page-per-allocation pools, for the footprint an edit has in a tab), ours-f16-edit-flash
# (the move edit with the flash gradient: its time and footprint against the default lean
# gradient's, whose guidance held a third as much on the CPU), ours-f16-profile (the kernels
# a UNet pass and a lean guidance evaluation launch, with their device time: what dominates),
# ours-f16-tasks (the UNet passes and the lean guidance with cubecl's wgpu submitting every
# 32 (its default), 128 and 512 dispatches: whether the per-submit cost is part of the
# launch cost on a real card; lavapipe's timings are too noisy to say), ours-spirv-f16 (the
# UNet passes, lean guidance, inversion and edits from the `spirv` build: the same engine with
# SPIR-V kernels and, where the driver offers cooperative matrices, matrix products on the
# tensor cores; these steps run right after ours-f16-edit, before the WGSL experiments),
# ours-spirv-f16-direct (its UNet passes and guidance with burn's conv2d, whose implicit-GEMM
# kernels can use the tensor cores too), ours-spirv-f16-profile (what dominates then),
# ours-f16-split (the UNet's matrix products at each resolution whole and cut into 2, 4 and 8
# parts along their shared axis, then the UNet passes with products under SPLIT_OUTPUTS
# outputs split and all whole: whether split-K fills the card where burn's WGSL matmul
# leaves it idle, and at which threshold), ours-f16-browser (the UNet's products whole by
# autotune's kernels, by the browser's one fixed kernel and by the other unit routines a tab
# could choose, then the UNet passes and the lean guidance with every product and attention as
# a tab runs them: what the browser's arithmetic costs on this card, where no browser can run,
# and what a choice of routine would give back).
STEPS="${STEPS:-ours-f16 torch-fp16 ours-f32 torch-fp32}"
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
# Row lists that the WGSL steps and their spirv twins share.
F16_ROWS="op: attention,batch,VAE,lean,inversion,whole edit: move,whole edit: drag,second"
# The spirv build's rows leave out the single attention ops (the UNet's `auto` prints what it
# timed per shape, burn's fused op against our kernel) and the VAE rows (the edits' phase lines
# time the encode and decode): a fresh process compiles and tunes every kernel of this build,
# and the UNet passes, the guidance and the whole edits are what it is for.
SPIRV_ROWS="batch,lean,inversion,whole edit: move,whole edit: drag,second"
DIRECT_ROWS="batch,lean"
PROFILE_ROWS="batch 1,batch 2,lean"
# 2^21 outputs: 8x8 products in 8 parts, 16x16 in 4, 32x32 in 2, 64x64 whole (products.rs).
SPLIT_OUTPUTS="${SPLIT_OUTPUTS:-2097152}"
# shellcheck disable=SC2086 # the argument strings are word lists on purpose
{
  # PyTorch first: it is short and steady, so a deadline cuts our steps, not the baseline.
  wanted torch-fp16 && step torch-fp16 100 python3 tests/reference/bench_torch.py $TORCH_ARGS --dtype fp16 --json "$RES/torch-fp16.json"
  wanted ours-f16 && step ours-f16 360 "$BIN" bench $PASS_ARGS --f16 $EDIT_ARGS --only "$F16_ROWS,flash"
  wanted ours-f16-edit && step ours-f16-edit 250 "$BIN" bench $PASS_ARGS --f16 $EDIT_ARGS --only "op: conv,op: attention,batch 2,inversion,whole edit: drag,second"
  # The spirv steps before the WGSL experiments: the tensor cores are the largest open question.
  if [ -n "$BIN_SPIRV" ]; then
    wanted ours-spirv-f16 && step ours-spirv-f16 360 "$BIN_SPIRV" bench $PASS_ARGS --f16 $EDIT_ARGS --only "$SPIRV_ROWS"
    wanted ours-spirv-f16-direct && step ours-spirv-f16-direct 90 "$BIN_SPIRV" bench $PASS_ARGS --f16 --no-peak --conv direct --skip-edits --only "$DIRECT_ROWS"
    wanted ours-spirv-f16-profile && step ours-spirv-f16-profile 150 "$BIN_SPIRV" bench --f16 --no-peak --runs 1 --profile --skip-edits --only "$PROFILE_ROWS"
  fi
  wanted ours-f16-direct && step ours-f16-direct 60 "$BIN" bench $PASS_ARGS --f16 --no-peak --conv direct --skip-edits --only "$DIRECT_ROWS"
  wanted ours-f16-browser-pools && step ours-f16-browser-pools 200 "$BIN" bench $PASS_ARGS --f16 $EDIT_ARGS --pools exclusive --only "batch 2,whole edit: move"
  wanted ours-f16-edit-flash && step ours-f16-edit-flash 200 "$BIN" bench $PASS_ARGS --f16 $EDIT_ARGS --gradients flash --only "batch 2,whole edit: move"
  wanted ours-f16-profile && step ours-f16-profile 150 "$BIN" bench --f16 --no-peak --runs 1 --profile --skip-edits --only "$PROFILE_ROWS"
  wanted ours-f16-split && step ours-f16-split 150 "$BIN" bench --f16 --no-peak --runs 3 --split-outputs "$SPLIT_OUTPUTS" --skip-edits --only "op: product,batch 1,batch 2"
  wanted ours-f16-browser && step ours-f16-browser 180 "$BIN" bench --f16 --no-peak --runs 3 --products browser --attention kernel --skip-edits --only "whole,batch 1,batch 2 (CFG),lean ("
  for tasks in 32 128 512; do
    wanted ours-f16-tasks && CUBECL_WGPU_MAX_TASKS=$tasks step "ours-f16-tasks-$tasks" 60 "$BIN" bench --f16 --no-peak --runs 5 --skip-edits --only "batch 1,batch 2,lean"
  done
  wanted ours-f16-tape && step ours-f16-tape 90 "$BIN" bench $PASS_ARGS --f16 --skip-edits --only "autodiff tape"
  wanted ours-f32 && step ours-f32 100 "$BIN" bench $PASS_ARGS --skip-edits --only "op: conv,op: attention,batch,VAE,lean,flash,inversion"
  wanted torch-fp32 && step torch-fp32 50 python3 tests/reference/bench_torch.py $TORCH_ARGS --dtype fp32 --skip-edits --json "$RES/torch-fp32.json"
}
# At most 8 files come back from a device call: two archives, and the tables printed last.
tar -C "$RES" -czf "$OUT/gpu-bench.tgz" .
[ -d target/environment ] && tar -C target -czf "$OUT/autotune-cache.tgz" environment
[ -d "$HOME/.cache/nvidia" ] && tar -C "$HOME/.cache" -czf "$OUT/nv-cache.tgz" nvidia
for f in "$RES"/machine.txt "$RES"/steps.txt "$RES"/*.md; do echo; echo "### $(basename "$f")"; cat "$f"; done
