// The page's side of the worker: requests as promises, progress and notices as callbacks. A
// rejected request's error has `cancelled` when the user cancelled it, and `restart` when the
// worker can run nothing more (its GPU device was lost, or its wasm module trapped): then
// `restart()` replaces the worker with a fresh one.
export class EngineClient {
  constructor({ onProgress, onNotice, onPreview }) {
    this.callbacks = { onProgress, onNotice, onPreview };
    this.pending = new Map();
    this.nextId = 1;
    this.spawn();
  }

  spawn() {
    const { onProgress, onNotice, onPreview } = this.callbacks;
    this.worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    this.worker.onmessage = (event) => {
      const msg = event.data;
      if (msg.type === "progress") return onProgress?.(msg);
      if (msg.type === "notice") return onNotice?.(msg.text);
      if (msg.type === "preview") return onPreview?.(msg);
      const waiting = this.pending.get(msg.id);
      if (!waiting) return;
      this.pending.delete(msg.id);
      if (msg.type === "done") waiting.resolve(msg);
      else {
        const error = new Error(msg.message);
        error.cancelled = Boolean(msg.cancelled);
        error.restart = Boolean(msg.restart);
        waiting.reject(error);
      }
    };
    this.worker.onerror = (event) => {
      const error = new Error(`The editing engine stopped (${event.message ?? "unknown error"}).`);
      error.restart = true;
      this.rejectAll(error);
    };
  }

  rejectAll(error) {
    for (const waiting of this.pending.values()) waiting.reject(error);
    this.pending.clear();
  }

  // A fresh worker in place of one that can run nothing more; what the old one had loaded
  // (the model, a kept inversion) is gone with it.
  restart() {
    this.worker.terminate();
    const error = new Error("The editing engine was restarted.");
    error.restart = true;
    this.rejectAll(error);
    this.spawn();
  }

  request(type, payload = {}, transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ type, id, ...payload }, transfer);
    });
  }

  cancel() {
    this.worker.postMessage({ type: "cancel" });
  }
}

// "1.2 GB", "340 MB", "12 kB".
export function formatBytes(n) {
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatSeconds(s) {
  if (!isFinite(s) || s < 0) return "";
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
}
