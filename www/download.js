// Downloading a model's files into the cache: streamed, written in chunks, resumed with HTTP
// Range after a dropped connection or a reload, and checked against the manifest's SHA-256
// (hashed incrementally in wasm, since WebCrypto only digests whole buffers).
import * as cache from "./cache.js";

// Bytes gathered before a chunk is written: small enough that a reload loses little, large
// enough that IndexedDB sees few transactions; far under the 64 MiB Blob cap.
const FLUSH_BYTES = 8 * 1024 * 1024;
const RETRIES = 5;

export function fileKey(manifest, path) {
  return `${manifest.id}/${path}`;
}

// The cache's record of one of the manifest's files, or undefined.
function fileRecord(manifest, f) {
  return cache.get("files", fileKey(manifest, f.path));
}

function fileUrl(manifest, path) {
  return new URL(path, manifest.base.endsWith("/") ? manifest.base : `${manifest.base}/`).href;
}

// A file's size: exact when the manifest has `size`, else its published `approx_size` (for
// the dialog and the quota check only; never used to judge a download).
function expectedSize(f) {
  return f.size ?? f.approx_size ?? 0;
}

// Bytes still to fetch for `manifest` (sizes from the manifest; unknown sizes count as 0).
export async function missingBytes(manifest) {
  let missing = 0;
  for (const f of manifest.files) {
    const rec = await fileRecord(manifest, f);
    if (!rec?.complete) missing += Math.max(0, expectedSize(f) - (rec?.received ?? 0));
  }
  return missing;
}

export async function isCached(manifest) {
  for (const f of manifest.files) {
    const rec = await fileRecord(manifest, f);
    if (!rec?.complete) return false;
  }
  return true;
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

// Fetches every file of `manifest` that the cache lacks. `wasm` provides Sha256Stream;
// `report({bytes, total, file})` sees progress; `notice(text)` hears about discarded files.
export async function download(manifest, wasm, report, notice) {
  const total = manifest.files.reduce((n, f) => n + expectedSize(f), 0);
  let before = 0;
  for (const f of manifest.files) {
    for (let attempt = 0; ; attempt++) {
      const size = await downloadFile(manifest, f, wasm, (bytes) => report({ bytes: before + bytes, total, file: f.path }));
      if (size !== null) {
        before += size;
        break;
      }
      await cache.deleteFile(fileKey(manifest, f.path));
      if (attempt >= 1) {
        throw new Error(`${f.path} failed its SHA-256 check twice; the server sends different bytes than the manifest names. It was discarded.`);
      }
      notice(`${f.path} failed its SHA-256 check and was discarded; downloading it again.`);
    }
  }
  const record = (await cache.get("models", manifest.id)) ?? {};
  await cache.put("models", {
    ...record,
    id: manifest.id,
    name: manifest.name,
    base: manifest.base,
    files: manifest.files.map((f) => f.path),
    size: before,
    added: record.added ?? Date.now(),
  });
}

// Downloads one file (resuming what the cache holds). Returns its size in bytes, or null when
// the finished file does not match its SHA-256.
async function downloadFile(manifest, f, wasm, report) {
  const key = fileKey(manifest, f.path);
  let rec = await cache.get("files", key);
  if (rec?.complete) {
    report(rec.received);
    return rec.received;
  }
  rec ??= { key, model: manifest.id, path: f.path, received: 0, chunks: 0, complete: false };
  const hasher = new wasm.Sha256Stream();
  // Resuming: the hash state is not stored, so the bytes already cached are hashed again.
  const reader = new FileReaderSync();
  for (const blob of await cache.chunks(key)) hasher.update(new Uint8Array(reader.readAsArrayBuffer(blob)));
  report(rec.received);

  let failures = 0;
  while (!rec.complete) {
    const headers = rec.received > 0 ? { Range: `bytes=${rec.received}-` } : {};
    let pending = [];
    let pendingBytes = 0;
    const flush = async () => {
      if (!pendingBytes) return;
      const blob = new Blob(pending);
      rec = { ...rec, received: rec.received + pendingBytes, chunks: rec.chunks + 1 };
      await cache.appendChunk(rec, rec.chunks - 1, blob);
      pending = [];
      pendingBytes = 0;
    };
    try {
      const response = await fetch(fileUrl(manifest, f.path), { headers, cache: "no-store" });
      if (rec.received > 0 && response.status === 200) {
        // The server ignored the Range: start this file over.
        await cache.deleteFile(key);
        rec = { ...rec, received: 0, chunks: 0 };
        hasher.finish();
      } else if (response.status === 416 && f.size !== undefined && rec.received === f.size) {
        // Everything was already there.
      } else if (!response.ok) {
        throw new Error(`the server answered ${response.status} ${response.statusText} for ${f.path}`);
      }
      const length = Number(response.headers.get("content-length"));
      const expectedEnd = length > 0 ? rec.received + length : undefined;
      if (response.body && response.status !== 416) {
        const stream = response.body.getReader();
        for (;;) {
          const { done, value } = await stream.read();
          if (done) break;
          hasher.update(value);
          pending.push(value);
          pendingBytes += value.length;
          report(rec.received + pendingBytes);
          if (pendingBytes >= FLUSH_BYTES) await flush();
        }
      }
      await flush();
      if (expectedEnd !== undefined && rec.received < expectedEnd) {
        throw new Error(`the connection closed after ${rec.received} of ${expectedEnd} bytes`);
      }
      if (f.size !== undefined && rec.received !== f.size) {
        throw new Error(`${f.path} ended after ${rec.received} of ${f.size} bytes`);
      }
      rec = { ...rec, complete: true, size: rec.received };
    } catch (e) {
      // What arrived before the failure is good data: keep it and ask for the rest.
      await flush();
      if (e.name === "QuotaExceededError") {
        throw new Error("the browser's storage is full: free space (or delete cached models in the storage panel) and try again; what was downloaded is kept");
      }
      if (++failures > RETRIES) throw new Error(`downloading ${f.path} failed ${failures} times (${e.message}); check the connection and try again; the download resumes where it stopped`);
      await sleep(Math.min(8000, 250 * 2 ** failures));
    }
  }
  const digest = hasher.finish();
  hasher.free();
  if (f.sha256 && digest !== f.sha256.toLowerCase()) return null;
  await cache.put("files", { ...rec, sha256: digest, verified: Boolean(f.sha256) });
  return rec.received;
}

// The cached files of a model as a Map of path → Blob, for the engine.
export async function cachedFiles(manifest) {
  const files = new Map();
  for (const f of manifest.files) {
    const rec = await fileRecord(manifest, f);
    if (!rec?.complete) throw new Error(`${f.path} is not in the cache; download the model first`);
    files.set(f.path, new Blob(await cache.chunks(fileKey(manifest, f.path))));
  }
  return files;
}
