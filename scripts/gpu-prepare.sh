#!/usr/bin/env bash
# Prepares what scripts/gpu-bench.sh needs on the GPU machine (which has no network), in the
# ignored folders .bench/ and .gl/ that `run` carries: the stripped CLI (xz), the diffusers
# wheel for tests/reference/bench_torch.py, and the Vulkan loader packages (../shared/docs/GPU.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dragonedit/target}"

mkdir -p .bench .gl
# The release build the tests use, stripped here (a separate strip profile would rebuild burn).
cargo build --release --bin dragonedit
strip -o .bench/dragonedit "$CARGO_TARGET_DIR/release/dragonedit"
xz -T0 -6 -f .bench/dragonedit
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
