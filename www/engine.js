// The page's side of the worker: requests as promises, progress and notices as callbacks.
export class EngineClient {
  constructor({ onProgress, onNotice, onPreview }) {
    this.worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
    this.pending = new Map();
    this.nextId = 1;
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
        waiting.reject(error);
      }
    };
    this.worker.onerror = (event) => {
      const error = new Error(`the editing engine stopped: ${event.message ?? "unknown error"}; reload the page (your photo and edits are kept in this tab until then)`);
      for (const waiting of this.pending.values()) waiting.reject(error);
      this.pending.clear();
    };
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
