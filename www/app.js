// The full-page editor: index.html holds one <dragon-editor>; `?model=URL` points it at another
// model (a manifest URL, or a folder serving dragonedit-manifest.json), e.g. self-hosted weights.
import { keepAppForOffline } from "./offline.js";

const params = new URLSearchParams(location.search);
const editor = document.querySelector("dragon-editor");
if (params.get("model")) editor.setAttribute("model", params.get("model"));
await import("./dragon-editor.js");
keepAppForOffline();
