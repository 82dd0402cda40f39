// The page's side of the worker: requests as promises, progress and notices as callbacks. A
// rejected request's error has `cancelled` when the user cancelled it, and `lost` when the
// worker can run nothing more (its GPU device was lost, or its wasm module trapped). A loss is
// reported once to `onLost`, however many requests were waiting on that worker, so that its
// owner restarts the engine once; `restart()` replaces the worker with a fresh one.
export class EngineClient {
  constructor({ onProgress, onNotice, onPreview, onLost }) {
    this.callbacks = { onProgress, onNotice, onPreview, onLost };
    this.pending = new Map();
    this.nextId = 1;
    this.spawn();
  }

  spawn() {
    const { onProgress, onNotice, onPreview } = this.callbacks;
    const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    this.worker = worker;
    this.lost = null;
    worker.onmessage = (event) => {
      // A replaced worker's last words answer nothing the page still waits for.
      if (worker !== this.worker) return;
      const msg = event.data;
      if (msg.type === "progress") return onProgress?.(msg);
      if (msg.type === "notice") return onNotice?.(msg.text);
      if (msg.type === "preview") return onPreview?.(msg);
      const waiting = this.pending.get(msg.id);
      if (!waiting) return;
      this.pending.delete(msg.id);
      if (msg.type === "done") return waiting.resolve(msg);
      const error = new Error(msg.message);
      error.cancelled = Boolean(msg.cancelled);
      error.lost = Boolean(msg.lost);
      waiting.reject(error);
      if (error.lost) this.lose(error);
    };
    worker.onerror = (event) => {
      if (worker !== this.worker) return;
      this.lose(new Error(`The editing engine stopped (${event.message ?? "unknown error"}).`));
    };
  }

  // The worker can run nothing more: every request still waiting on it fails with `error`,
  // later ones fail at once, and the owner hears of it once.
  lose(error) {
    if (this.lost) return;
    error.lost = true;
    this.lost = error;
    this.rejectAll(error);
    this.callbacks.onLost?.(error);
  }

  rejectAll(error) {
    for (const waiting of this.pending.values()) waiting.reject(error);
    this.pending.clear();
  }

  // A fresh worker in place of one that can run nothing more; what the old one had loaded
  // (the model, a kept inversion) is gone with it, and so are the requests it still had.
  restart() {
    this.worker.terminate();
    const error = new Error("The editing engine was restarted.");
    error.lost = true;
    this.rejectAll(error);
    this.spawn();
  }

  request(type, payload = {}, transfer = []) {
    if (this.lost) return Promise.reject(this.lost);
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
