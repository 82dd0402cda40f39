#!/usr/bin/env bash
# Prepares what scripts/gpu-bench.sh needs on the GPU machine (which has no network), in the
# ignored folders .bench/ and .gl/ that `run` carries: the stripped CLI in its two builds (xz),
# the diffusers wheel for tests/reference/bench_torch.py, and the Vulkan loader packages
# (../shared/docs/GPU.md).
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
cd "$ROOT"

mkdir -p .bench .gl
# The release build the tests use, stripped here (a separate strip profile would rebuild burn),
# and the same with `--features spirv` (kernels in SPIR-V, with the card's matrix cores where
# its Vulkan driver offers cooperative matrices; cubecl-spirv patched, see tools.sh). The
# default build goes last, so that the binary the tests and the README use is the WGSL one again.
cargo_spirv build --release --bin dragonedit
strip -o .bench/dragonedit-spirv "$CARGO_TARGET_DIR/release/dragonedit"
cargo build --release --bin dragonedit
strip -o .bench/dragonedit "$CARGO_TARGET_DIR/release/dragonedit"
xz -T0 -6 -f .bench/dragonedit .bench/dragonedit-spirv
rm -f .bench/diffusers-*.whl
pip download --quiet --no-deps --dest .bench "diffusers==$(sed -n 's/^diffusers==//p' tests/reference/requirements.txt)"

if ! ls .gl/*.deb >/dev/null 2>&1; then
  lists="${TMPDIR:-/tmp}/amd64-lists"
  mkdir -p "$lists/partial"
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
  apt-get "${o[@]}" update -qq
  (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
du -sh .bench .gl
