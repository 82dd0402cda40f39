// Iframe mode: the editor alone, for sites that prefer isolation. `?model=` picks the model
// and `?reuse-memory=` the MiB kept between edits (the element's attributes); `?parent=ORIGIN`
// names the embedding page, which then receives {type: "dragonedit:result", blob, reused},
// "dragonedit:progress" and "dragonedit:error" messages and may send
// {type: "dragonedit:load-image", blob} and {type: "dragonedit:release-memory"}. Without
// `parent` nothing is posted out.
import { keepAppForOffline } from "./offline.js";

const params = new URLSearchParams(location.search);
const editor = document.querySelector("dragon-editor");
for (const name of ["model", "reuse-memory"]) {
  if (params.get(name)) editor.setAttribute(name, params.get(name));
}
await import("./dragon-editor.js");
keepAppForOffline();

const parentOrigin = params.get("parent");
if (parentOrigin && window.parent !== window) {
  for (const type of ["result", "progress", "error", "ready"]) {
    editor.addEventListener(type, (e) => window.parent.postMessage({ type: `dragonedit:${type}`, ...e.detail }, parentOrigin));
  }
  window.addEventListener("message", (e) => {
    if (e.origin !== parentOrigin) return;
    if (e.data?.type === "dragonedit:load-image" && e.data.blob instanceof Blob) editor.loadImage(e.data.blob);
    if (e.data?.type === "dragonedit:release-memory") editor.releaseMemory().catch((err) => editor.fail(err));
  });
}
