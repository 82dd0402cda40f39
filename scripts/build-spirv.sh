#!/usr/bin/env bash
# Builds the native CLI with its kernels compiled to SPIR-V (`--features spirv`), with the fix to
# cubecl-spirv that devices without explicit workgroup layouts need (tools.sh, cargo_spirv).
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
cargo_spirv build --release --bin dragonedit "$@"
echo "built $CARGO_TARGET_DIR/release/dragonedit"
