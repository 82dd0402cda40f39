// The model cache in IndexedDB: one record per model and per file, and the file's bytes as
// Blob chunks (at most CHUNK_BYTES each) so a download can stop anywhere and resume, and a
// weight file is never one huge allocation. Only the worker touches it.

const DB_NAME = "dragonedit";
const DB_VERSION = 1;

function done(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function finished(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error("storage transaction aborted"));
  });
}

let dbPromise = null;

export function openDb() {
  dbPromise ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, DB_VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      db.createObjectStore("models", { keyPath: "id" });
      db.createObjectStore("files", { keyPath: "key" });
      const chunks = db.createObjectStore("chunks", { keyPath: ["key", "index"] });
      chunks.createIndex("byKey", "key");
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
    request.onblocked = () => reject(new Error("the model cache is open in another tab with an older version; close it and reload"));
  });
  return dbPromise;
}

async function store(name, mode = "readonly") {
  const db = await openDb();
  const tx = db.transaction(name, mode);
  return [tx, tx.objectStore(name)];
}

// One record of the "models" or "files" store, or undefined.
export async function get(name, key) {
  const [, s] = await store(name);
  return done(s.get(key));
}

export async function put(name, record) {
  const [tx, s] = await store(name, "readwrite");
  s.put(record);
  return finished(tx);
}

export async function listModels() {
  const [, s] = await store("models");
  return done(s.getAll());
}

// The chunk Blobs of a file, in order.
export async function chunks(key) {
  const [, s] = await store("chunks");
  const all = await done(s.index("byKey").getAll(key));
  return all.sort((a, b) => a.index - b.index).map((c) => c.blob);
}

// Appends one chunk and the file record that counts it, atomically: after a crash either both
// are there or neither.
export async function appendChunk(record, index, blob) {
  const db = await openDb();
  const tx = db.transaction(["chunks", "files"], "readwrite");
  tx.objectStore("chunks").put({ key: record.key, index, blob });
  tx.objectStore("files").put(record);
  return finished(tx);
}

export async function deleteFile(key) {
  const db = await openDb();
  const tx = db.transaction(["chunks", "files"], "readwrite");
  const range = IDBKeyRange.bound([key, -Infinity], [key, Infinity]);
  tx.objectStore("chunks").delete(range);
  tx.objectStore("files").delete(key);
  return finished(tx);
}

export async function deleteModel(id) {
  const model = await get("models", id);
  for (const path of model?.files ?? []) await deleteFile(`${id}/${path}`);
  const [tx, s] = await store("models", "readwrite");
  s.delete(id);
  return finished(tx);
}
