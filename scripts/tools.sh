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

# Runs `cargo SUBCOMMAND --features spirv ARGS...` (kernels compiled to SPIR-V) with cubecl-spirv
# mended by scripts/cubecl-spirv.patch. Without it a device that lacks
# VK_KHR_workgroup_memory_explicit_layout (lavapipe among them) crashes in the driver on the
# first kernel with workgroup memory: cubecl-spirv 0.11.3's other lowering of it declares the
# variable with its pointer type and takes its address as the value type. The patched copy is
# made once per patch, in the target directory; Cargo.lock, which the patch rewrites, is put
# back afterwards. Not for use beside another cargo build in this clone.
cargo_spirv() {
  local subcommand="$1"
  shift
  need_apt patch
  local version patched stamp crate lock_copy status=0
  version="$(grep -A1 '^name = "cubecl-spirv"$' "$ROOT/Cargo.lock" | sed -n 's/version = "\(.*\)"/\1/p')"
  patched="$CARGO_TARGET_DIR/patched/cubecl-spirv-$version"
  stamp="$(sha256sum "$ROOT/scripts/cubecl-spirv.patch" | cut -c1-16)"
  if [ "$(cat "$patched/.dragonedit-patch" 2>/dev/null)" != "$stamp" ]; then
    (cd "$ROOT" && cargo fetch --locked --quiet)
    crate="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"cubecl-spirv-$version.crate" | head -n 1)"
    rm -rf "$patched"
    mkdir -p "$patched"
    tar -xzf "$crate" -C "$patched" --strip-components=1
    if ! patch -s -p1 -d "$patched" < "$ROOT/scripts/cubecl-spirv.patch"; then
      echo "scripts/cubecl-spirv.patch does not apply to cubecl-spirv $version: see whether that version still needs it" >&2
      return 1
    fi
    echo "$stamp" > "$patched/.dragonedit-patch"
  fi
  lock_copy="$(mktemp)"
  cp "$ROOT/Cargo.lock" "$lock_copy"
  (cd "$ROOT" && cargo --config "patch.crates-io.cubecl-spirv.path=\"$patched\"" \
    "$subcommand" --features spirv "$@") || status=$?
  cp "$lock_copy" "$ROOT/Cargo.lock"
  rm -f "$lock_copy"
  return "$status"
}
