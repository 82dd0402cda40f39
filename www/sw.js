// The service worker, copied to the site's root (so that its scope is the whole app): it keeps
// the app's own files, so that a later visit opens, loads the model from IndexedDB and edits
// with no network at all. Network first: online, every load gets what the server has now (an
// update is never hidden behind this copy); offline, the copy from the last visit. It keeps
// nothing else: model files live in IndexedDB (www/cache.js), and they, Range requests and
// every other URL pass through untouched.
const CACHE = "dragonedit-app";

// Paths from the site's root; tests/js/sw.test.mjs checks that every file in www/ is here.
const APP_FILES = [
  "index.html",
  "style.css",
  "dragonedit.js",
  "dragonedit_bg.wasm",
  "www/app.js",
  "www/cache.js",
  "www/demo.html",
  "www/demo.js",
  "www/download.js",
  "www/dragon-editor.js",
  "www/editor.css",
  "www/embed.html",
  "www/embed.js",
  "www/engine.js",
  "www/models/sd15.json",
  "www/offline.js",
  "www/sketch.js",
  "www/style.css",
  "www/worker.js",
];

const appUrls = () => APP_FILES.map((path) => new URL(path, self.registration.scope).href);

// The app file a request asks for, as its cache key: without the query (`?model=…`), and a
// folder as its index.html. Null when the request is for anything else.
function appFile(request) {
  if (request.method !== "GET" || request.headers.has("range")) return null;
  const url = new URL(request.url);
  url.search = "";
  url.hash = "";
  if (url.pathname.endsWith("/")) url.pathname += "index.html";
  return appUrls().includes(url.href) ? url.href : null;
}

// The whole app at once, so that even a first visit, whose files were fetched before this
// worker ran, can be opened offline afterwards. A file that fails is left out with a warning
// rather than leaving the rest unkept.
self.addEventListener("install", (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    const kept = await Promise.allSettled(appUrls().map(async (url) => {
      const response = await fetch(url);
      if (response.status !== 200) throw new Error(`${url} answered ${response.status}`);
      await cache.put(url, response);
    }));
    for (const k of kept) if (k.status === "rejected") console.warn(`dragonedit: not kept for offline use: ${k.reason?.message ?? k.reason}`);
    await self.skipWaiting();
  })());
});

self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

self.addEventListener("fetch", (event) => {
  const key = appFile(event.request);
  if (!key) return;
  event.respondWith((async () => {
    let response;
    try {
      response = await fetch(event.request);
    } catch (offline) {
      const kept = await (await caches.open(CACHE)).match(key);
      if (kept) return kept;
      throw offline;
    }
    if (response.status === 200) {
      const copy = response.clone();
      event.waitUntil(caches.open(CACHE).then((cache) => cache.put(key, copy)));
    }
    return response;
  })());
});
