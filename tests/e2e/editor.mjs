// End-to-end tests of the built site in headless Chromium, WebGPU on SwiftShader, with the tiny
// model of tests/fixtures served locally: first visit (license, download with a dropped
// connection and a corrupted file), a second visit from the cache with no weight requests,
// drag and move edits, cancelling, bad photos, an offline visit, no WebGPU, a lost GPU device,
// and the widget demo with the memory it keeps between edits. Every request must stay on the
// page's origin.
// Usage: node editor.mjs DIST_DIR [ARTIFACT_DIR]
import { mkdtemp, mkdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startServer } from "../../scripts/site-server.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const dist = resolve(process.argv[2] ?? join(here, "../../dist"));
const artifacts = resolve(process.argv[3] ?? join(here, "artifacts"));
const modelDir = join(here, "../fixtures/tiny-sd");
const photoPath = join(here, "../fixtures/drag/image.png");
// A fixed port: IndexedDB belongs to the origin, and the origin includes the port.
const port = Number(process.env.E2E_PORT ?? 18733);
const MODEL = "/models/tiny/dragonedit-manifest.json";
// Few steps at the smallest working resolution: SwiftShader runs WebGPU on the CPU, slowly.
const STEPS = 2;
const RESOLUTION = 64;
const ONLY = process.env.E2E_ONLY ? new RegExp(process.env.E2E_ONLY) : null;

await mkdir(artifacts, { recursive: true });
const { server, state, url } = await startServer({
  dist, port, models: { tiny: modelDir }, licenses: { tiny: { name: "the test license", url: "/LICENSE-test" } },
});
const profile = await mkdtemp(join(tmpdir(), "dragonedit-e2e-"));
const base = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
const webgpu = ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"];

let passed = 0;
let failed = 0;
const foreign = [];

async function browser(args, userDataDir = profile, options = {}) {
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", headless: true, args: [...base, ...args],
    viewport: { width: 1280, height: 900 }, ...options,
  });
  context.on("request", (r) => {
    if (!r.url().startsWith(url) && !r.url().startsWith("blob:") && !r.url().startsWith("data:")) foreign.push(r.url());
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("requestfailed", (r) => console.log(`  [request failed] ${r.url()}`));
  page.on("response", (r) => r.status() >= 400 && console.log(`  [${r.status()}] ${r.url()}`));
  page.on("console", (m) => (m.type() === "error" || process.env.E2E_VERBOSE) && console.log(`  [console] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`  [pageerror] ${e.message}`));
  return { context, page };
}

async function test(name, body) {
  if (ONLY && !ONLY.test(name)) return;
  const started = Date.now();
  try {
    await body();
    console.log(`ok: ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    passed++;
  } catch (e) {
    console.log(`FAILED: ${name} (${((Date.now() - started) / 1000).toFixed(1)} s): ${e.stack ?? e}`);
    failed++;
  }
}

function check(ok, text) {
  if (!ok) throw new Error(text);
}

const status = (page) => page.locator("dragon-editor .message");

// `stale` is the message shown before the action under test: a status that still shows it
// (an earlier error, say) is the old state, not the answer to the action.
async function waitState(page, wanted, timeout = 300_000, stale = null) {
  await page.waitForFunction(
    ({ w, stale }) => {
      const m = document.querySelector("dragon-editor")?.shadowRoot?.querySelector(".message");
      if (!m || (stale !== null && m.textContent === stale)) return false;
      return m.dataset.state === w || (w !== "error" && m.dataset.state === "error");
    },
    { w: wanted, stale },
    { timeout },
  );
  const text = await status(page).textContent();
  const state = await status(page).getAttribute("data-state");
  check(state === wanted, `expected the status to become ${wanted}, got ${state}: ${text}`);
  return text;
}

async function openPhoto(page, path = photoPath) {
  await page.locator("dragon-editor input.open").setInputFiles(path);
  await page.waitForFunction(() => {
    const root = document.querySelector("dragon-editor").shadowRoot;
    return root.querySelector(".drop").hidden || root.querySelector(".message").dataset.state === "error";
  }, null, { timeout: 30_000 }).catch(async (e) => {
    throw new Error(`${e.message}; status: ${await status(page).textContent()}`);
  });
  const state = await status(page).getAttribute("data-state");
  check(state !== "error", `opening the photo failed: ${await status(page).textContent()}`);
}

// Drags on the photo between two points given as fractions of its box.
async function dragOnPhoto(page, from, to, steps = 8) {
  const box = await page.locator("dragon-editor .stage:not(.reference) canvas.overlay").boundingBox();
  const at = ([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height];
  await page.mouse.move(...at(from));
  await page.mouse.down();
  await page.mouse.move(...at(to), { steps });
  await page.mouse.up();
}

async function setAdvanced(page) {
  await page.locator("dragon-editor details.advanced summary").click();
  await page.locator("dragon-editor input.steps").fill(String(STEPS));
  await page.locator("dragon-editor input.resolution").fill(String(RESOLUTION));
}

// Runs the edit and waits for the element's result event (or its error event).
async function runAndWait(page) {
  await page.evaluate(() => {
    const editor = document.querySelector("dragon-editor");
    window.__nextResult = new Promise((resolve, reject) => {
      editor.addEventListener("result", (e) => resolve(e.detail.blob), { once: true });
      editor.addEventListener("error", (e) => reject(new Error(e.detail.message)), { once: true });
    });
  });
  await page.locator("dragon-editor button.run").click();
  return page.evaluate(async () => {
    const blob = await window.__nextResult;
    const bitmap = await createImageBitmap(blob);
    return { width: bitmap.width, height: bitmap.height, type: blob.type };
  });
}

const weightRequests = () => state.log.filter((r) => r.path.startsWith("/models/"));

await test("first visit: license dialog, download into IndexedDB with a dropped connection and a corrupted file", async () => {
  state.faults = [
    { path: "/models/tiny/unet/diffusion_pytorch_model.safetensors", kind: "drop", bytes: 1 << 20, times: 1 },
    { path: "/models/tiny/vae/diffusion_pytorch_model.safetensors", kind: "corrupt", times: 1 },
  ];
  state.log = [];
  const { context, page } = await browser(webgpu);
  try {
    await page.goto(`${url}/?model=${MODEL}`);
    const dialog = page.locator("dragon-editor dialog.license");
    await dialog.waitFor({ state: "visible", timeout: 120_000 });
    const text = await dialog.textContent();
    check(/tiny/.test(text) && /the test license/.test(text) && /MB|kB/.test(text), `dialog text: ${text}`);
    check(weightRequests().every((r) => r.path.endsWith("dragonedit-manifest.json")), "weights were requested before the license was accepted");
    await page.locator("dragon-editor button.accept").click();
    await waitState(page, "ok");
    const unet = state.log.filter((r) => r.path.endsWith("unet/diffusion_pytorch_model.safetensors"));
    check(unet.length === 2 && unet[1].range === `bytes=${1 << 20}-`, `UNet requests: ${JSON.stringify(unet)}`);
    const vae = state.log.filter((r) => r.path.endsWith("vae/diffusion_pytorch_model.safetensors"));
    check(vae.length === 2, `the corrupted VAE was fetched ${vae.length} times`);
    const notices = await page.locator("dragon-editor .notices").textContent();
    check(/vae\/diffusion_pytorch_model.safetensors failed its SHA-256 check and was discarded/.test(notices), `notices: ${notices}`);
    // The panel is filled by a storage request to the worker that follows the "Ready" status.
    await page.waitForFunction(() => document.querySelector("dragon-editor").shadowRoot.querySelector(".models").textContent !== "", null, { timeout: 30_000 });
    const storage = await page.locator("dragon-editor .models").textContent();
    check(/tiny: 12 MB/.test(storage), `storage panel: ${storage}`);
  } finally {
    await context.close();
  }
});

await test("a download interrupted by closing the browser resumes on the next visit", async () => {
  const other = await mkdtemp(join(tmpdir(), "dragonedit-e2e-resume-"));
  const unet = "/models/tiny/unet/diffusion_pytorch_model.safetensors";
  state.faults = [{ path: unet, kind: "stall", bytes: 1 << 20, times: 1 }];
  state.log = [];
  try {
    let { context, page } = await browser(webgpu, other);
    await page.goto(`${url}/?model=${MODEL}`);
    await page.locator("dragon-editor button.accept").click();
    await page.waitForFunction(() => /Downloading/.test(document.querySelector("dragon-editor").shadowRoot.querySelector(".message").textContent));
    for (let i = 0; i < 100 && !state.log.some((r) => r.path === unet); i++) await new Promise((r) => setTimeout(r, 100));
    await context.close();
    const before = state.log.length;
    ({ context, page } = await browser(webgpu, other));
    try {
      await page.goto(`${url}/?model=${MODEL}`);
      const dialog = page.locator("dragon-editor dialog.license");
      await dialog.waitFor({ state: "visible", timeout: 60_000 });
      await page.locator("dragon-editor button.accept").click();
      await waitState(page, "ok");
      const again = state.log.slice(before).filter((r) => r.path.startsWith("/models/") && !r.path.endsWith("manifest.json")).map((r) => r.path);
      check(again.length === 3 && again[0] === unet, `after the reload the page fetched ${JSON.stringify(again)}; only the unfinished UNet and the two files after it were expected`);
    } finally {
      await context.close();
    }
  } finally {
    await rm(other, { recursive: true, force: true });
  }
});

await test("second visit: the model loads from the cache with no weight request", async () => {
  state.faults = [];
  state.log = [];
  const { context, page } = await browser(webgpu);
  try {
    await page.goto(`${url}/?model=${MODEL}`);
    await waitState(page, "ok");
    check(weightRequests().length === 0, `requests for the model: ${JSON.stringify(weightRequests())}`);
    check(!(await page.locator("dragon-editor dialog.license").isVisible()), "the license dialog showed again");

    await test("drag edit: mask, a point pair, a result of the photo's size; screenshot", async () => {
      await openPhoto(page);
      await setAdvanced(page);
      await page.locator("dragon-editor button.tool[data-tool=brush]").click();
      await dragOnPhoto(page, [0.25, 0.3], [0.75, 0.6], 12);
      await page.locator("dragon-editor button.tool[data-tool=points]").click();
      await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
      await page.locator("dragon-editor").screenshot({ path: join(artifacts, "editor-with-mask-and-points.png") });
      await page.evaluate(() => {
        window.__previews = [];
        document.querySelector("dragon-editor").addEventListener("preview", (e) => window.__previews.push(e.detail.step));
      });
      const result = await runAndWait(page);
      const previews = await page.evaluate(() => window.__previews);
      check(previews.length === 1 && previews[0] === 1, `live previews at steps ${JSON.stringify(previews)}; expected one, after step 1 of 2`);
      check(result.width === 128 && result.height === 128 && result.type === "image/png", `result ${JSON.stringify(result)}`);
      check(!(await page.locator("dragon-editor a.download").isHidden()), "no download link");
    });

    await test("undo, add a point pair, run again: the photo's inversion is reused", async () => {
      await page.locator("dragon-editor button.undo-edit").click();
      await dragOnPhoto(page, [0.3, 0.7], [0.35, 0.65]);
      await page.evaluate(() => {
        window.__phases = [];
        document.querySelector("dragon-editor").addEventListener("progress", (e) => window.__phases.push(e.detail));
      });
      await page.evaluate(() => {
        document.querySelector("dragon-editor").addEventListener("result", (e) => (window.__reused = e.detail.reused), { once: true });
      });
      const result = await runAndWait(page);
      const phases = await page.evaluate(() => window.__phases);
      const inverting = phases.filter((p) => p.phase === "inverting" && p.step < p.total);
      check(inverting.length === 0, `inversion steps on the second edit of one photo: ${JSON.stringify(inverting)}`);
      // The default budget keeps the guided step's reference features too.
      const reused = await page.evaluate(() => window.__reused);
      check(reused?.inversion === true && reused.featureSteps >= 1, `the result event's reuse: ${JSON.stringify(reused)}`);
      check(phases.some((p) => p.phase === "editing"), `no editing progress: ${JSON.stringify(phases)}`);
      check(result.width === 128 && result.height === 128, `result ${JSON.stringify(result)}`);
    });

    await test("move edit on the result, then undo back to the original", async () => {
      // Each strength field shows what the engine uses for the mode when it is left empty: the
      // reference's defaults (ALGORITHM.md §8).
      const placeholders = () => page.evaluate(() => Object.fromEntries([...document.querySelector("dragon-editor").shadowRoot.querySelectorAll(".advanced input[class^='s-']")]
        .map((i) => [i.className.slice(2), i.placeholder])));
      const drag = await placeholders();
      check(drag.guidance_scale === "4" && drag.energy_scale === "2" && drag.w_edit === "4" && drag.w_content === "6" && drag.w_inpaint === "0.2",
        `drag's defaults: ${JSON.stringify(drag)}`);
      await page.locator("dragon-editor select.mode").selectOption("move");
      const move = await placeholders();
      check(move.energy_scale === "0.5" && move.w_contrast === "0.2" && move.w_inpaint === "0.8" && Object.keys(move).length === 6,
        `move's defaults: ${JSON.stringify(move)}`);
      await dragOnPhoto(page, [0.3, 0.3], [0.6, 0.6], 12);
      await page.locator("dragon-editor button.tool[data-tool=points]").click();
      await dragOnPhoto(page, [0.45, 0.45], [0.6, 0.5]);
      const result = await runAndWait(page);
      check(result.width === 128 && result.height === 128, `result ${JSON.stringify(result)}`);
      await page.locator("dragon-editor button.undo-edit").click();
      await page.locator("dragon-editor button.undo-edit").click();
      check(await page.locator("dragon-editor button.undo-edit").isDisabled(), "undo should stop at the original");
      check(await page.locator("dragon-editor button.redo-edit").isEnabled(), "redo should be possible");
    });

    await test("cancel an edit midway, then run another", async () => {
      await page.locator("dragon-editor select.mode").selectOption("drag");
      await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
      await page.locator("dragon-editor input.steps").fill("50");
      await page.locator("dragon-editor button.run").click();
      await page.waitForFunction(() => /Inverting: [1-9]/.test(document.querySelector("dragon-editor").shadowRoot.querySelector(".message").textContent), null, { timeout: 300_000 });
      await page.locator("dragon-editor button.cancel").click();
      const text = await waitState(page, "ok");
      check(/Cancelled/.test(text), `after cancel: ${text}`);
      await page.locator("dragon-editor input.steps").fill(String(STEPS));
      const result = await runAndWait(page);
      check(result.width === 128, `result ${JSON.stringify(result)}`);
    });

    await test("an empty mask in move mode gets a clear message", async () => {
      await page.locator("dragon-editor select.mode").selectOption("move");
      await page.locator("dragon-editor button.clear-mask").click();
      const before = await status(page).textContent();
      await page.locator("dragon-editor button.run").click();
      const text = await waitState(page, "error", 10_000, before);
      check(/mask is empty/.test(text), text);
    });

    await test("a file that is not an image, and a huge photo", async () => {
      const before = await status(page).textContent();
      await page.locator("dragon-editor input.open").setInputFiles({ name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("hello") });
      const text = await waitState(page, "error", 10_000, before);
      check(/not an image/.test(text), text);
      const note = await page.evaluate(async () => {
        const c = new OffscreenCanvas(6000, 4000);
        c.getContext("2d").fillRect(0, 0, 10, 10);
        const editor = document.querySelector("dragon-editor");
        await editor.loadImage(await c.convertToBlob({ type: "image/png" }));
        return editor.shadowRoot.querySelector(".notices").textContent;
      });
      check(/6000x4000; it was scaled to 2048x1365/.test(note), note);
    });
  } finally {
    await context.close();
  }
});

await test("offline: a later visit opens the page, loads the model and edits with the server unreachable", async () => {
  state.faults = [];
  const { context, page } = await browser(webgpu);
  try {
    // Online first. The service worker keeps the app's files while it installs, and takes
    // over the page once it has.
    await page.goto(`${url}/?model=${MODEL}`);
    await waitState(page, "ok");
    await page.waitForFunction(() => navigator.serviceWorker.controller !== null, null, { timeout: 60_000 });
    state.offline = true;
    state.log = [];
    await page.reload();
    await waitState(page, "ok");
    check(state.log.some((r) => r.path === "/" && r.offline), `the reload did not try the server: ${JSON.stringify(state.log)}`);
    await openPhoto(page);
    await setAdvanced(page);
    await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
    const result = await runAndWait(page);
    check(result.width === 128 && result.type === "image/png", `the offline edit: ${JSON.stringify(result)}`);
  } finally {
    state.offline = false;
    await context.close();
  }
});

await test("the widget demo: an edit, its result event, the memory kept between edits", async () => {
  state.log = [];
  const { context, page } = await browser(webgpu);
  // Runs an edit and returns the host page's n-th result event (or fails with its error).
  const nthResult = async (n) => {
    await page.locator("dragon-editor button.run").click();
    await page.waitForFunction((n) => window.__dragoneditResults?.length >= n || /error:/.test(document.getElementById("log").textContent), n, { timeout: 600_000 });
    const r = await page.evaluate((n) => window.__dragoneditResults?.[n - 1], n);
    check(r, `edit ${n} failed: ${await page.locator("#log").textContent()}`);
    return r;
  };
  try {
    // reuse-memory=0: no reference features kept, the inversion still is.
    await page.goto(`${url}/www/demo.html?model=${MODEL}&reuse-memory=0`);
    await waitState(page, "ok");
    check(weightRequests().length === 0, "the demo fetched weights again");
    await openPhoto(page);
    await setAdvanced(page);
    await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
    const r = await nthResult(1);
    check(r.width === 128 && r.height === 128 && r.size > 0, JSON.stringify(r));
    check(r.reused.inversion === false, `the first edit reused an inversion: ${JSON.stringify(r)}`);
    // The result became the photo: back to the original, so that the next edit is of it.
    await page.locator("dragon-editor button.undo-edit").click();
    await dragOnPhoto(page, [0.3, 0.7], [0.35, 0.65]);
    const second = await nthResult(2);
    check(second.reused.inversion === true && second.reused.featureSteps === 0, `reuse-memory=0, second edit: ${JSON.stringify(second)}`);
    await page.evaluate(() => document.querySelector("dragon-editor").releaseMemory());
    await page.locator("dragon-editor button.undo-edit").click();
    await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
    const third = await nthResult(3);
    check(third.reused.inversion === false, `after releaseMemory(): ${JSON.stringify(third)}`);
    const log = await page.locator("#log").textContent();
    check(/result: 128x128 PNG/.test(log), "the host page did not log the result");
    check(/the photo's inversion reused, with 0 guided steps' features/.test(log), `the host page did not log the reuse: ${log}`);
    // SwiftShader has no shader-f16, so the model falls back to f32 (and says so).
    check(/computing in f32/.test(log), `the ready event did not report f32: ${log}`);
    // The page timed a convolution both ways on this GPU before loading and says which won.
    // That also runs im2col + matmul in the browser, which the edits here (burn's kernel wins
    // on SwiftShader) do not: in f32 its result must be burn's to rounding.
    const timed = log.match(/convolutions: (direct|im2col \+ matmul) \(timed: im2col \+ matmul \d+\.\d ms, direct \d+\.\d ms; error against f32: im2col \+ matmul (\S+), direct (\S+)\)/);
    check(timed, `the ready event did not report the timed convolutions: ${log}`);
    console.log(`  SwiftShader ${timed[0]}`);
    check(Number(timed[2]) < 1e-5, `im2col + matmul differs from burn's convolution: ${timed[0]}`);
    // The largest working resolution the GPU's buffers hold: the tiny model's f32 decoder needs
    // 128 bytes a pixel, so every WebGPU adapter (128 MiB a buffer at least) holds 1024 px.
    const largest = Number(log.match(/images up to (\d+) px/)?.[1]);
    check(largest >= 1024 && largest <= 2048 && largest % 64 === 0, `the ready event's largest resolution: ${log}`);
    // A GPU that holds less lowers the working resolution, and says so.
    const capped = await page.evaluate(() => {
      const editor = document.querySelector("dragon-editor");
      const field = editor.shadowRoot.querySelector(".resolution");
      field.value = "512";
      editor.capResolution(320);
      return { value: field.value, max: field.max, notices: editor.shadowRoot.querySelector(".notices").textContent };
    });
    check(capped.value === "320" && capped.max === "320" && /images up to about 320 x 320 pixels/.test(capped.notices), `capped resolution: ${JSON.stringify(capped)}`);
  } finally {
    await context.close();
  }
});

await test("a lost GPU device: the editor starts its engine again and keeps the photo, its edit and the marks, but not in a loop", async () => {
  // context.route does not see what a service worker fetches, so this test runs the app
  // without one: the one an earlier visit registered is removed, and no new one registers.
  const { context, page } = await browser(webgpu, profile, { serviceWorkers: "block" });
  await page.goto(`${url}/www/models/sd15.json`);
  await page.evaluate(async () => {
    for (const r of await navigator.serviceWorker.getRegistrations()) await r.unregister();
  });
  // Served with the worker, and this test's only change to the site: a prelude that keeps the
  // GPUDevice the engine asks for and destroys it on request, as a driver reset or the browser
  // taking the GPU back would lose it.
  const prelude = `const requestDevice = GPUAdapter.prototype.requestDevice;
GPUAdapter.prototype.requestDevice = async function (...args) {
  const device = await requestDevice.apply(this, args);
  (self.__devices ??= []).push(device);
  return device;
};
self.addEventListener("message", (e) => {
  if (e.data?.type === "test:lose-device") for (const d of self.__devices ?? []) d.destroy();
});
`;
  await context.route(/\/worker\.js$/, async (route) => {
    const response = await route.fetch();
    await route.fulfill({ response, body: prelude + (await response.text()) });
  });
  const notices = page.locator("dragon-editor .notices");
  const lose = () => page.evaluate(() => document.querySelector("dragon-editor").engine.worker.postMessage({ type: "test:lose-device" }));
  try {
    await page.goto(`${url}/?model=${MODEL}`);
    await waitState(page, "ok");
    await openPhoto(page);
    await setAdvanced(page);
    await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
    const first = await runAndWait(page);
    check(first.width === 128, `first edit: ${JSON.stringify(first)}`);
    // A bad setting from the host page is noticed once, not again by each restarted engine.
    await page.evaluate(() => document.querySelector("dragon-editor").setAttribute("reuse-memory", "lots"));
    await page.waitForFunction(() => /reuse-memory="lots"/.test(document.querySelector("dragon-editor").shadowRoot.querySelector(".notices").textContent));
    await lose();
    await dragOnPhoto(page, [0.3, 0.7], [0.35, 0.65]);
    await page.locator("dragon-editor button.run").click();
    await page.waitForFunction(() => /started its engine again/.test(document.querySelector("dragon-editor").shadowRoot.querySelector(".notices").textContent), null, { timeout: 300_000 });
    const text = await notices.textContent();
    console.log(`  notice: ${text}`);
    check(/GPU device was lost|engine stopped/.test(text), `the notice does not say what happened: ${text}`);
    check(!/Backtrace|Caused by/.test(text), `the notice carries the error's internals: ${text}`);
    check((await status(page).getAttribute("data-state")) === "ok", `after the restart: ${await status(page).textContent()}`);
    check(await page.locator("dragon-editor button.undo-edit").isEnabled(), "the first edit was lost with the engine");
    check((await notices.textContent()).match(/reuse-memory="lots"/g).length === 1, `the bad setting was noticed again: ${await notices.textContent()}`);
    // The marks are kept too: the same edit runs again, on the new engine.
    const again = await runAndWait(page);
    check(again.width === 128, `the edit after the restart: ${JSON.stringify(again)}`);
    // A loss after the fresh engine has done its work is a passing one again...
    await lose();
    await dragOnPhoto(page, [0.4, 0.5], [0.5, 0.45]);
    await page.locator("dragon-editor button.run").click();
    await page.waitForFunction(() => document.querySelector("dragon-editor").shadowRoot.querySelector(".notices").textContent.match(/started its engine again/g)?.length === 2, null, { timeout: 300_000 });
    check((await status(page).getAttribute("data-state")) === "ok", `after the second restart: ${await status(page).textContent()}`);
    // ...but one before the fresh engine finishes an edit is not: the editor says so, once,
    // instead of restarting in a loop, and keeps both edits.
    await lose();
    const stale = await status(page).textContent();
    await page.locator("dragon-editor button.run").click();
    const last = await waitState(page, "error", 300_000, stale);
    check(/GPU device was lost.*happened again right after the editor restarted/.test(last), `after a loss on the fresh engine: ${last}`);
    check((await notices.textContent()).match(/started its engine again/g).length === 2, `the engine was started again once more: ${await notices.textContent()}`);
    check(await page.locator("dragon-editor button.run").isDisabled(), "the run button works on a lost engine");
    await page.locator("dragon-editor button.undo-edit").click();
    check(await page.locator("dragon-editor button.undo-edit").isEnabled(), "the two edits were not kept");
  } finally {
    await context.close();
  }
});

await test("without WebGPU the page says so", async () => {
  const fresh = await mkdtemp(join(tmpdir(), "dragonedit-e2e-nogpu-"));
  const { context, page } = await browser([], fresh);
  try {
    await page.goto(`${url}/?model=${MODEL}`);
    const text = await waitState(page, "error", 60_000);
    check(/WebGPU/.test(text) && /Chrome or Edge/.test(text), text);
  } finally {
    await context.close();
    await rm(fresh, { recursive: true, force: true });
  }
});

await test("every request stayed on the page's origin", async () => {
  check(foreign.length === 0, `requests left the origin: ${foreign.join(", ")}`);
});

server.close();
await rm(profile, { recursive: true, force: true });
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
