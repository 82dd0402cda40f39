#!/usr/bin/env bash
# Builds the web app and serves it on http://127.0.0.1:8080 (PORT changes the port).
# The page downloads Stable Diffusion 1.5 from Hugging Face after the user accepts its license.
# MODEL_DIR=/path/to/a/diffusers/folder serves local weights instead, at
# http://127.0.0.1:8080/?model=/models/local/ (any URL serving dragonedit-manifest.json works).
source "$(dirname "${BASH_SOURCE[0]}")/tools.sh"
need_node
build_site
PORT="${PORT:-8080}"
MODEL_ARGS=()
if [ -n "${MODEL_DIR:-}" ]; then
  MODEL_ARGS=(--model "local=$MODEL_DIR")
fi
log "serving $ROOT/dist on http://127.0.0.1:$PORT (Ctrl-C to stop)"
exec node "$ROOT/scripts/site-server.mjs" "$ROOT/dist" --port "$PORT" "${MODEL_ARGS[@]}"
