// Page bootstrap: load the wasm module Trunk built, then check WebGPU with a small tensor
// program and report the result. The editor UI replaces this when the editing issue lands.
const status = document.getElementById("status");

function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
}

async function main() {
  if (!("gpu" in navigator)) {
    show("error", "WebGPU is not available in this browser. Use a current Chrome or Edge on a computer with a GPU.");
    return;
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    show("error", "WebGPU is present but no GPU adapter was found. Check that hardware acceleration is enabled.");
    return;
  }
  // Trunk writes the wasm-bindgen output next to index.html (Trunk.toml: no file hashes).
  const wasm = await import("./dragonedit.js");
  await wasm.default({ module_or_path: "./dragonedit_bg.wasm" });
  document.getElementById("version").textContent = `dragonedit ${wasm.version()}`;
  show("busy", "Checking WebGPU…");
  const got = await wasm.webgpu_check();
  const want = wasm.webgpu_check_expected();
  const ok = Math.abs(got - want) <= 1e-3 * Math.max(1, Math.abs(want));
  window.__webgpuCheck = { got, want, ok };
  show(ok ? "ok" : "error", ok
    ? "WebGPU works: a convolution and attention ran on your GPU and matched the CPU."
    : `WebGPU gave a wrong result (${got} instead of ${want}); this GPU or driver cannot run dragonedit.`);
}

main().catch((e) => {
  window.__webgpuCheck = { error: String(e) };
  show("error", `Could not start: ${e}`);
});
