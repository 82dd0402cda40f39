// The service worker (www/sw.js) in a stand-in worker scope: what it keeps when installed, what
// it answers online and offline, what it leaves alone, and that it lists every file of the app.
// Usage: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import vm from "node:vm";

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
const source = await readFile(join(root, "www/sw.js"), "utf8");
const SCOPE = "https://app.example/edit/";

// A fresh worker scope: `server` maps URLs to bodies (null: the network is down).
function worker(server) {
  const listeners = {};
  const stores = new Map();
  const log = { fetched: [], skipWaiting: 0, claimed: 0, warnings: [] };
  const caches = {
    async open(name) {
      if (!stores.has(name)) stores.set(name, new Map());
      const store = stores.get(name);
      return {
        async put(key, response) {
          store.set(String(key), await response.text());
        },
        async match(key) {
          return store.has(String(key)) ? new Response(store.get(String(key))) : undefined;
        },
      };
    },
  };
  // As a static server answers: the query ignored, a folder's index.html for the folder.
  const fetch = async (input) => {
    const url = typeof input === "string" ? input : input.url;
    log.fetched.push(url);
    if (server.offline) throw new TypeError("Failed to fetch");
    const file = new URL(url);
    file.search = "";
    if (file.pathname.endsWith("/")) file.pathname += "index.html";
    return file.href in server.files ? new Response(server.files[file.href], { status: 200 }) : new Response("", { status: 404 });
  };
  const self = {
    registration: { scope: SCOPE },
    addEventListener: (type, fn) => (listeners[type] = fn),
    skipWaiting: async () => log.skipWaiting++,
    clients: { claim: async () => log.claimed++ },
  };
  const console = { warn: (text) => log.warnings.push(text) };
  vm.runInNewContext(source, { self, caches, fetch, console, URL, Response, Promise });
  return { listeners, stores, log };
}

// Dispatches an extendable event and waits for everything it was given to wait on.
async function dispatch(listener, fields) {
  const waits = [];
  let answer = null;
  const event = {
    ...fields,
    waitUntil: (p) => waits.push(p),
    respondWith: (p) => (answer = p),
  };
  listener(event);
  const response = answer && (await answer.then((r) => r, (e) => e));
  for (let i = 0; i < waits.length; i++) await waits[i];
  return { answered: answer !== null, response };
}

const kept = (w, url) => w.stores.get("dragonedit-app")?.get(url);

async function appFiles() {
  const list = [];
  const sw = worker({ files: {} });
  await dispatch(sw.listeners.install, {});
  for (const url of sw.log.fetched) list.push(url.slice(SCOPE.length));
  return list;
}

test("installing keeps every app file, even where one fails, and takes over at once", async () => {
  const files = Object.fromEntries((await appFiles()).map((f) => [SCOPE + f, `body of ${f}`]));
  delete files[`${SCOPE}www/demo.html`];
  const w = worker({ files });
  await dispatch(w.listeners.install, {});
  for (const url of Object.keys(files)) assert.equal(kept(w, url), files[url].toString());
  assert.equal(kept(w, `${SCOPE}www/demo.html`), undefined);
  assert.equal(w.log.warnings.length, 1);
  assert.match(w.log.warnings[0], /www\/demo\.html answered 404/);
  assert.equal(w.log.skipWaiting, 1);
  await dispatch(w.listeners.activate, {});
  assert.equal(w.log.claimed, 1);
});

test("online, an app file comes from the network and refreshes the kept copy", async () => {
  const server = { files: { [`${SCOPE}index.html`]: "v1", [`${SCOPE}www/worker.js`]: "w1" } };
  const w = worker(server);
  await dispatch(w.listeners.install, {});
  server.files[`${SCOPE}index.html`] = "v2";
  const page = await dispatch(w.listeners.fetch, { request: new Request(`${SCOPE}?model=/models/tiny/`) });
  assert.equal(page.answered, true);
  assert.equal(await page.response.text(), "v2");
  assert.equal(kept(w, `${SCOPE}index.html`), "v2");
  // A server error is passed on, and the kept copy stays.
  delete server.files[`${SCOPE}www/worker.js`];
  const missing = await dispatch(w.listeners.fetch, { request: new Request(`${SCOPE}www/worker.js`) });
  assert.equal(missing.response.status, 404);
  assert.equal(kept(w, `${SCOPE}www/worker.js`), "w1");
});

test("offline, an app file comes from the kept copy; one never kept fails as the network did", async () => {
  const server = { files: { [`${SCOPE}index.html`]: "page", [`${SCOPE}dragonedit_bg.wasm`]: "wasm" } };
  const w = worker(server);
  await dispatch(w.listeners.install, {});
  server.offline = true;
  for (const [url, body] of [[`${SCOPE}index.html?model=x#top`, "page"], [SCOPE, "page"], [`${SCOPE}dragonedit_bg.wasm`, "wasm"]]) {
    const { answered, response } = await dispatch(w.listeners.fetch, { request: new Request(url) });
    assert.equal(answered, true, url);
    assert.equal(await response.text(), body, url);
  }
  const lost = await dispatch(w.listeners.fetch, { request: new Request(`${SCOPE}www/app.js`) });
  assert.ok(lost.response instanceof TypeError);
});

test("model files, Range requests, other methods, other sites and unlisted paths pass through", async () => {
  const w = worker({ files: {} });
  const requests = [
    new Request(`${SCOPE}models/tiny/unet/diffusion_pytorch_model.safetensors`),
    new Request(`${SCOPE}dragonedit_bg.wasm`, { headers: { range: "bytes=100-" } }),
    new Request(`${SCOPE}index.html`, { method: "POST", body: "x" }),
    new Request("https://huggingface.co/edit/index.html"),
    new Request("https://app.example/index.html"),
    new Request(`${SCOPE}www/`),
  ];
  for (const request of requests) {
    const { answered } = await dispatch(w.listeners.fetch, { request });
    assert.equal(answered, false, `${request.method} ${request.url}`);
  }
  assert.deepEqual(w.log.fetched, []);
});

test("the list holds every file the build ships from www/, and the build's own outputs", async () => {
  const listed = await appFiles();
  const shipped = [];
  async function walk(dir) {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) await walk(path);
      else shipped.push(relative(root, path).split("\\").join("/"));
    }
  }
  await walk(join(root, "www"));
  const expected = shipped.filter((f) => f !== "www/sw.js").concat(["index.html", "style.css", "dragonedit.js", "dragonedit_bg.wasm"]);
  assert.deepEqual([...listed].sort(), [...expected].sort());
});
