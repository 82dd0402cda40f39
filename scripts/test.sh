#!/usr/bin/env bash
# Runs every test: formatting, the page's JavaScript unit tests (tests/js, node's test runner),
# clippy (native and wasm32, inside the builds), Rust unit and parity tests on the CPU and on
# wgpu (Mesa's software Vulkan, lavapipe), the wasm build, and the editor's end-to-end tests in
# headless Chromium with WebGPU on SwiftShader (tests/e2e/editor.mjs; screenshots go to
# tests/e2e/artifacts).
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
cd "$ROOT"

need_apt mesa-vulkan-drivers libvulkan1 chromium chromium-driver
need_wasm_target
need_node

log "cargo fmt --check"
cargo fmt --all -- --check

log "JavaScript unit tests (the engine client, the service worker)"
node --test --test-reporter=spec tests/js/*.test.mjs

# Clippy lints inside the builds the tests and the site need anyway: clippy-driver wraps rustc
# for this crate only, as `cargo clippy` itself does, but in a full build instead of a check
# build. Dependencies are then compiled once per target, not twice (a cold check build of burn
# costs minutes the 90-minute CI limit does not have). MIR optimisation is off in clippy-driver;
# LLVM still optimises, and the results are the same.
export RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver)"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

log "cargo build with clippy -D warnings (native, all targets)"
cargo build --release --all-targets

# The wasm32 track (wasm-bindgen-cli and Trunk when missing, then the site build, whose cargo
# build inherits the clippy wrapper and so lints the shipped features) runs beside the cargo
# tests, which leave part of the two cores idle. Not beside the native build: two cold builds of
# burn at once thrash the cores (measured on a cold machine: 66 min for both, against 31 + 25
# one after the other), while a build beside the tests gains (warm: 26.7 min for tests and a
# Trunk install together, against 22.8 + 9.5). Its log is printed when it is joined.
SITE_LOG="$(mktemp)"
setsid -w bash -c 'source "$1/scripts/tools.sh"; build_site' _ "$ROOT" > "$SITE_LOG" 2>&1 &
SITE_PID=$!
trap 'kill -- -"$SITE_PID" 2>/dev/null || true' EXIT
log "started the wasm32 track in the background (pid $SITE_PID)"

log "cargo test (CPU and wgpu/lavapipe)"
# lavapipe is slow to autotune; the minimal level keeps first calls short. --nocapture shows
# which wgpu tests were skipped and why.
CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}" cargo test --release -- --nocapture

log "joining the wasm32 track"
site_status=0
wait "$SITE_PID" || site_status=$?
cat "$SITE_LOG"
if [ "$site_status" -ne 0 ]; then
  log "the wasm32 track failed (exit $site_status)"
  exit "$site_status"
fi

# The native `spirv` build (kernels compiled to SPIR-V, how an NVIDIA card reaches its tensor
# cores): our kernels and the models against diffusers again, on lavapipe. After the wasm32
# track, since cargo_spirv rewrites Cargo.lock while it builds. Its first build compiles burn's
# wgpu crates again with the `vulkan` feature (7 minutes warm on 2 cores), and the tests take
# about 8 more; a cold run is already over an hour by here (README), so past 45 minutes it is
# left out, with a note, to keep the run inside CI's 90-minute limit; the next run has the
# cache and runs it.
if [ "$SECONDS" -lt 2700 ] || [ -n "${SPIRV_TESTS:-}" ]; then
  log "cargo test --features spirv (our kernels, the models against diffusers)"
  CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}" \
    cargo_spirv test --release --lib --test diffusers_parity --test flash_kernel -- --nocapture
else
  log "NOT RUN: the spirv build's tests ($((SECONDS / 60)) minutes in; SPIRV_TESTS=1 runs them anyway)"
fi

log "browser end-to-end tests (headless Chromium, WebGPU on SwiftShader, the tiny model)"
(cd tests/e2e && { [ -d node_modules/playwright-core ] || npm install --no-audit --no-fund --silent; } && node editor.mjs "$ROOT/dist" "$ROOT/tests/e2e/artifacts")
