#!/usr/bin/env bash
# Runs every test: formatting, clippy (native and wasm32), unit and parity tests on the CPU and
# on wgpu (Mesa's software Vulkan, lavapipe), the wasm build, and the editor's end-to-end tests
# in headless Chromium with WebGPU on SwiftShader (tests/e2e/editor.mjs; screenshots go to
# tests/e2e/artifacts).
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
cd "$ROOT"

need_apt mesa-vulkan-drivers libvulkan1 chromium chromium-driver
need_wasm_target
need_node

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (native)"
cargo clippy --release --all-targets -- -D warnings
log "cargo clippy (wasm32)"
CARGO_TARGET_DIR="$WASM_TARGET_DIR" cargo clippy --release --lib --target wasm32-unknown-unknown -- -D warnings

log "cargo test (CPU and wgpu/lavapipe)"
# lavapipe is slow to autotune; the minimal level keeps first calls short. --nocapture shows
# which wgpu tests were skipped and why.
CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}" cargo test --release -- --nocapture

build_site

log "browser end-to-end tests (headless Chromium, WebGPU on SwiftShader, the tiny model)"
(cd tests/e2e && { [ -d node_modules/playwright-core ] || npm install --no-audit --no-fund --silent; } && node editor.mjs "$ROOT/dist" "$ROOT/tests/e2e/artifacts")
