# Shared by scripts/serve.sh and scripts/test.sh: installs what is missing (from the package
# registries only), and skips whatever is already on PATH at the right version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Build outside the clone so repeated runs (and CI on the same machine) reuse the artifacts.
# The wasm32 build gets its own directory: one cargo build directory cannot be used by two
# builds at once, and the two targets share almost nothing.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dragonedit/target}"
WASM_TARGET_DIR="${WASM_TARGET_DIR:-$CARGO_TARGET_DIR-wasm}"
export PATH="$HOME/.cargo/bin:$PATH"
WASM_BINDGEN_VERSION="$(grep -A1 '^name = "wasm-bindgen"$' "$ROOT/Cargo.lock" | sed -n 's/version = "\(.*\)"/\1/p')"
TRUNK_VERSION="0.21.14"

log() { printf '\n== %s [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }

need_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

need_node() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || need_apt nodejs npm
}

need_wasm_target() {
  rustup target list --installed 2>/dev/null | grep -q wasm32-unknown-unknown \
    || rustup target add wasm32-unknown-unknown
}

need_wasm_bindgen() {
  if ! wasm-bindgen --version 2>/dev/null | grep -q "$WASM_BINDGEN_VERSION"; then
    log "cargo install wasm-bindgen-cli@$WASM_BINDGEN_VERSION"
    # Not --locked: one of its locked dependencies is missing from the registry mirror.
    # Lightly optimised: it only rewrites one wasm file per build, and a full release build
    # of it costs a cold CI run minutes (4.3 on 2 cores, measured).
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
      CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_TARGET_DIR="$HOME/.cache/dragonedit/tools-target" \
      cargo install --force "wasm-bindgen-cli@$WASM_BINDGEN_VERSION"
  fi
}

need_trunk() {
  if ! trunk --version 2>/dev/null | grep -q "$TRUNK_VERSION"; then
    log "cargo install trunk@$TRUNK_VERSION"
    # An unoptimised build of the tool, without its TLS stack and update check: it only
    # orchestrates cargo, wasm-bindgen and file copies, offline. Optimised with default features
    # it took 19 min on 2 cores, at opt-level 1 9.5 min, this way 5.2 min (measured).
    CARGO_TARGET_DIR="$HOME/.cache/dragonedit/tools-target" \
      cargo install --debug --locked --no-default-features --force "trunk@$TRUNK_VERSION"
  fi
}

# Builds the web app into dist/ (offline: Trunk uses the wasm-bindgen on PATH).
build_site() {
  need_wasm_target
  need_wasm_bindgen
  need_trunk
  log "trunk build --release"
  (cd "$ROOT" && CARGO_TARGET_DIR="$WASM_TARGET_DIR" TRUNK_SKIP_VERSION_CHECK=true trunk build --release)
}
