// The engine's worker: it owns the wasm module, the WebGPU device, the model cache and the
// downloads, so the page never freezes. Messages in: {type, id, ...}; every answer carries the
// request's id. Progress reports come from the engine (serde-wasm-bindgen) as
// {phase, step, total}, and from downloads as {phase: "downloading", bytes, total}.
import init, * as wasm from "../dragonedit.js";
import * as cache from "./cache.js";
import { cachedFiles, download, isCached, missingBytes } from "./download.js";

const ready = init({ module_or_path: new URL("../dragonedit_bg.wasm", import.meta.url) });
let cancelRequested = false;
// Requests that run one at a time, and what the worker is doing while they run.
const LONG_REQUESTS = { download: "downloading", load: "loading the model", edit: "editing" };
let busy = null;
let loadedModel = null;
// What load_model reported: {precision: "f16" | "f32", convolutions, timings}.
let loadedInfo = null;
// Set when the wasm module trapped (a panic) or lost its GPU device: nothing more can run here.
let crashed = null;

function post(message, transfer = []) {
  self.postMessage(message, transfer);
}

// Manifests are fetched once and kept with the cached model, so a later visit works offline.
async function resolveManifest(source) {
  const cached = await cache.get("models", source);
  if (cached?.manifest && (await isCached(cached.manifest))) return cached.manifest;
  const url = source.endsWith(".json") ? source : `${source.replace(/\/$/, "")}/dragonedit-manifest.json`;
  let response;
  try {
    response = await fetch(url, { cache: "no-store" });
  } catch (e) {
    if (cached?.manifest) return cached.manifest;
    throw new Error(`cannot reach the model at ${url} (${e.message}); check the connection or the model address`);
  }
  if (!response.ok) throw new Error(`the model manifest ${url} answered ${response.status}; check the model address`);
  const m = await response.json();
  if (!Array.isArray(m.files) || m.files.length === 0) throw new Error(`${url} lists no files`);
  const manifest = {
    id: source,
    name: m.name ?? source,
    base: new URL(m.base ?? ".", new URL(url, self.location.href)).href,
    license: m.license ?? null,
    requirements: m.requirements ?? {},
    files: m.files,
  };
  await cache.put("models", { ...(cached ?? {}), id: source, name: manifest.name, manifest, files: manifest.files.map((f) => f.path) });
  return manifest;
}

const handlers = {
  async inspect({ source }) {
    const manifest = await resolveManifest(source);
    const missing = await missingBytes(manifest);
    const cached = await isCached(manifest);
    let quota = null;
    if (self.navigator.storage?.estimate) {
      const e = await self.navigator.storage.estimate();
      quota = { usage: e.usage ?? 0, quota: e.quota ?? 0 };
    }
    return { manifest, missing, cached, quota };
  },

  async download({ source }) {
    const manifest = await resolveManifest(source);
    await ready;
    const started = performance.now();
    await download(
      manifest,
      wasm,
      ({ bytes, total, file }) => {
        const seconds = (performance.now() - started) / 1000;
        post({ type: "progress", phase: "downloading", step: bytes, total, file, rate: seconds > 0 ? bytes / seconds : 0 });
      },
      (text) => post({ type: "notice", text }),
    );
    return { cached: true };
  },

  async load({ source }) {
    const manifest = await resolveManifest(source);
    await ready;
    if (loadedModel === source && wasm.model_loaded()) return { loaded: true, ...loadedInfo };
    const files = await cachedFiles(manifest);
    loadedInfo = await wasm.load_model(files, (p) => {
      post({ type: "progress", ...p });
      return true;
    });
    loadedModel = source;
    return { loaded: true, ...loadedInfo };
  },

  async edit({ spec, image, reference, assets }) {
    await ready;
    cancelRequested = false;
    const map = new Map(Object.entries(assets ?? {}));
    const { png, reusedInversion, reusedFeatureSteps } = await wasm.run_edit(
      spec,
      image,
      reference ?? undefined,
      map,
      (p) => {
        post({ type: "progress", ...p });
        return !cancelRequested;
      },
      (step, preview) => post({ type: "preview", step, png: preview }, [preview.buffer]),
    );
    return { png, reused: { inversion: reusedInversion, featureSteps: reusedFeatureSteps } };
  },

  // MiB of GPU memory the reference features kept for the next edit of a photo may hold
  // (null: the engine's default).
  async configure({ keptFeaturesMiB }) {
    await ready;
    if (keptFeaturesMiB == null) {
      wasm.set_kept_features_mib(undefined);
      return { keptFeaturesMiB: null };
    }
    const mib = Math.min(2 ** 32 - 1, Math.floor(Number(keptFeaturesMiB)));
    if (!(mib >= 0)) throw new Error(`the GPU memory to keep between edits must be a number of MiB (0 or more), not ${keptFeaturesMiB}`);
    wasm.set_kept_features_mib(mib);
    return { keptFeaturesMiB: mib };
  },

  // Forgets what was kept for the next edit and gives the free GPU buffers back.
  async release() {
    await ready;
    wasm.release_memory();
    return { released: true };
  },

  async storage() {
    const models = await cache.listModels();
    return { models: models.map((m) => ({ id: m.id, name: m.name, size: m.size ?? 0, complete: Boolean(m.size) })) };
  },

  async remove({ source }) {
    if (loadedModel === source) loadedModel = null;
    await cache.deleteModel(source);
    return { removed: source };
  },

  async defaults() {
    await ready;
    return { strengths: wasm.default_strengths() };
  },

  async check() {
    await ready;
    const got = await wasm.webgpu_check();
    const want = wasm.webgpu_check_expected();
    return { got, want, ok: Math.abs(got - want) <= 1e-3 * Math.max(1, Math.abs(want)) };
  },
};

self.onmessage = async (event) => {
  const msg = event.data;
  if (msg.type === "cancel") {
    cancelRequested = true;
    return;
  }
  if (crashed) {
    post({ type: "error", id: msg.id, message: crashed, lost: true });
    return;
  }
  const handler = handlers[msg.type];
  if (!handler) {
    post({ type: "error", id: msg.id, message: `unknown request ${msg.type}` });
    return;
  }
  const long = LONG_REQUESTS[msg.type];
  if (long && busy) {
    post({ type: "error", id: msg.id, message: `still ${busy}; wait for it or cancel it first` });
    return;
  }
  if (long) busy = long;
  try {
    const result = await handler(msg);
    const transfer = result.png ? [result.png.buffer] : [];
    post({ type: "done", id: msg.id, ...result }, transfer);
  } catch (e) {
    let message = e instanceof Error ? e.message : String(e);
    // A trap leaves the wasm module's state untrusted, and a lost GPU device runs nothing
    // more: either way only a new worker (a new module, a new device) can go on, and the page
    // starts one (`lost`).
    const lost = e?.name === "DeviceLostError";
    if (e instanceof WebAssembly.RuntimeError || lost) {
      crashed = lost ? `${message[0].toUpperCase()}${message.slice(1)}.` : `The editing engine stopped (${message}), for example because the GPU was lost.`;
      message = crashed;
    }
    post({ type: "error", id: msg.id, message, cancelled: message === "cancelled", lost: Boolean(crashed) });
  } finally {
    if (long) busy = null;
  }
};
