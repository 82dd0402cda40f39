#!/usr/bin/env bash
# Builds the web app and serves it on http://127.0.0.1:8080 (set PORT to change it).
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
build_site
PORT="${PORT:-8080}"
log "serving $ROOT/dist on http://127.0.0.1:$PORT (Ctrl-C to stop)"
cd "$ROOT" && CARGO_TARGET_DIR="$WASM_TARGET_DIR" TRUNK_SKIP_VERSION_CHECK=true exec trunk serve --release --address 127.0.0.1 --port "$PORT"
