// The host side of the widget demo: pick the model from `?model=` (and the memory kept between
// edits from `?reuse-memory=`), load the element, and show what its events deliver.
const params = new URLSearchParams(location.search);
const editor = document.querySelector("dragon-editor");
for (const name of ["model", "reuse-memory"]) {
  if (params.get(name)) editor.setAttribute(name, params.get(name));
}
await import("./dragon-editor.js");

const log = document.getElementById("log");
function note(text) {
  const li = document.createElement("li");
  li.textContent = text;
  log.append(li);
}
editor.addEventListener("ready", (e) => {
  const { model, precision, convolutions, timings, maxResolution } = e.detail;
  const timed = timings
    ? ` (timed: im2col + matmul ${timings.gemm_ms.toFixed(1)} ms, direct ${timings.direct_ms.toFixed(1)} ms; error against f32: im2col + matmul ${timings.gemm_error.toExponential(1)}, direct ${timings.direct_error.toExponential(1)})`
    : "";
  note(`ready: ${model}, computing in ${precision}, images up to ${maxResolution} px, convolutions: ${convolutions}${timed}`);
});
editor.addEventListener("error", (e) => note(`error: ${e.detail.message}`));
editor.addEventListener("result", async (e) => {
  const { inversion, featureSteps } = e.detail.reused;
  note(`result: ${e.detail.width}x${e.detail.height} PNG, ${e.detail.blob.size} bytes; ` +
    (inversion ? `the photo's inversion reused, with ${featureSteps} guided steps' features` : "the photo inverted"));
  const img = document.getElementById("received");
  img.src = URL.createObjectURL(e.detail.blob);
  img.hidden = false;
  window.__dragoneditResults ??= [];
  window.__dragoneditResults.push({ width: e.detail.width, height: e.detail.height, size: e.detail.blob.size, reused: e.detail.reused });
});
