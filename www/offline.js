// Registers the service worker (sw.js, at the site's root) that keeps the app's own files, so a
// later visit opens and edits with no network. Only the app's own pages call this, not the
// element: a site that embeds <dragon-editor> decides about service workers on its origin.
// Where the browser allows none (an origin that is not secure, say), the app works online only.
export function keepAppForOffline() {
  navigator.serviceWorker
    ?.register(new URL("../sw.js", import.meta.url))
    .catch((e) => console.warn(`dragonedit will need the network to open next time: ${e.message}`));
}
