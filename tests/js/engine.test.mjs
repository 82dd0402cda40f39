// The page's client of the engine worker (www/engine.js), with a stand-in Worker: how requests
// end when the worker answers, fails, or is lost with several requests waiting on it.
// Usage: node --test tests/js/
import { test } from "node:test";
import assert from "node:assert/strict";

const workers = [];
globalThis.Worker = class {
  constructor(url, options) {
    this.url = String(url);
    this.options = options;
    this.posted = [];
    this.terminated = false;
    workers.push(this);
  }

  postMessage(msg) {
    this.posted.push(msg);
  }

  terminate() {
    this.terminated = true;
  }

  answer(msg) {
    this.onmessage({ data: msg });
  }
};

const { EngineClient } = await import("../../www/engine.js");

function client() {
  const losses = [];
  const notices = [];
  const engine = new EngineClient({ onLost: (e) => losses.push(e), onNotice: (t) => notices.push(t) });
  return { engine, losses, notices, worker: () => workers.at(-1) };
}

// Settles a promise into { value } or { error } without an unhandled rejection.
const settle = (p) => p.then((value) => ({ value }), (error) => ({ error }));

test("a request resolves with the worker's answer to its id, and notices go to their callback", async () => {
  const { engine, notices, worker } = client();
  assert.equal(worker().options.type, "module");
  assert.match(worker().url, /\/worker\.js$/);
  const a = engine.request("storage");
  const b = engine.request("inspect", { source: "m" });
  const [first, second] = worker().posted;
  assert.deepEqual(second, { type: "inspect", id: second.id, source: "m" });
  assert.notEqual(first.id, second.id);
  worker().answer({ type: "notice", text: "hello" });
  worker().answer({ type: "done", id: second.id, cached: true });
  worker().answer({ type: "done", id: first.id, models: [] });
  assert.deepEqual((await b).cached, true);
  assert.deepEqual((await a).models, []);
  assert.deepEqual(notices, ["hello"]);
});

test("an ordinary error or a cancel fails only its request and is no loss", async () => {
  const { engine, losses, worker } = client();
  const a = settle(engine.request("edit"));
  const b = settle(engine.request("storage"));
  const [edit, storage] = worker().posted;
  worker().answer({ type: "error", id: edit.id, message: "cancelled", cancelled: true });
  const { error } = await a;
  assert.equal(error.cancelled, true);
  assert.equal(error.lost, false);
  worker().answer({ type: "error", id: storage.id, message: "no such model" });
  assert.equal((await b).error.message, "no such model");
  assert.equal(losses.length, 0);
  // The worker still takes requests.
  const c = engine.request("storage");
  worker().answer({ type: "done", id: worker().posted[2].id, models: [] });
  assert.deepEqual((await c).models, []);
});

test("a lost engine fails every waiting request and is reported once", async () => {
  const { engine, losses, worker } = client();
  const edit = settle(engine.request("edit"));
  const configure = settle(engine.request("configure"));
  const release = settle(engine.request("release"));
  const [editMsg, configureMsg] = worker().posted;
  worker().answer({ type: "error", id: editMsg.id, message: "The GPU device was lost (Destroyed).", lost: true });
  // The crashed worker answers what it still had the same way; nothing waits for those now.
  worker().answer({ type: "error", id: configureMsg.id, message: "The GPU device was lost (Destroyed).", lost: true });
  for (const p of [edit, configure, release]) {
    const { error } = await p;
    assert.equal(error.lost, true);
    assert.equal(error.message, "The GPU device was lost (Destroyed).");
  }
  assert.equal(losses.length, 1);
  assert.equal(losses[0].message, "The GPU device was lost (Destroyed).");
  // Until it is restarted, a request fails at once and is not sent to the lost worker.
  const posted = worker().posted.length;
  const late = await settle(engine.request("storage"));
  assert.equal(late.error.lost, true);
  assert.equal(worker().posted.length, posted);
  assert.equal(losses.length, 1);
});

test("a worker error (a crash outside any request) is one loss for all that waited", async () => {
  const { engine, losses, worker } = client();
  const a = settle(engine.request("edit"));
  const b = settle(engine.request("storage"));
  worker().onerror({ message: "RuntimeError: unreachable" });
  worker().onerror({ message: "RuntimeError: unreachable" });
  for (const p of [a, b]) {
    const { error } = await p;
    assert.equal(error.lost, true);
    assert.match(error.message, /engine stopped \(RuntimeError: unreachable\)/);
  }
  assert.equal(losses.length, 1);
});

test("restart replaces the worker; the old one's late answers and errors reach nothing", async () => {
  const { engine, losses, worker } = client();
  const old = worker();
  const pending = settle(engine.request("load"));
  engine.restart();
  assert.equal(old.terminated, true);
  const { error } = await pending;
  assert.equal(error.lost, true);
  assert.notEqual(worker(), old);
  const fresh = engine.request("load");
  const freshId = worker().posted[0].id;
  old.answer({ type: "error", id: freshId, message: "late", lost: true });
  old.onerror({ message: "late" });
  assert.equal(losses.length, 0);
  worker().answer({ type: "done", id: freshId, precision: "f32" });
  assert.equal((await fresh).precision, "f32");
  // The new worker's own loss is reported again.
  worker().onerror({ message: "again" });
  assert.equal(losses.length, 1);
});
