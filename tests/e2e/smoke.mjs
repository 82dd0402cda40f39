// Smoke test of the built site: serve dist/ on 127.0.0.1, open it in headless Chromium with
// WebGPU on SwiftShader, and check that the page loads and a WebGPU tensor program (conv +
// attention through burn's wgpu backend) matches the CPU. Also checks the page's message
// when WebGPU is unavailable.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { chromium } from "playwright-core";

const dist = process.argv[2];
if (!dist) throw new Error("usage: node smoke.mjs DIST_DIR");

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css" };
const server = createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^(\.\.[/\\])+/, "");
  const file = join(dist, path === "/" ? "index.html" : path);
  try {
    const body = await readFile(file);
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
    res.end(body);
  } catch {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const url = `http://127.0.0.1:${server.address().port}/`;

const baseArgs = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
let passed = 0;
let failed = 0;

async function check(name, args, body) {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: [...baseArgs, ...args] });
  try {
    const page = await browser.newPage();
    const requests = [];
    page.on("request", (r) => requests.push(r.url()));
    page.on("console", (m) => console.log(`  [console] ${m.text()}`));
    await page.goto(url);
    await body(page, requests);
    console.log(`ok: ${name}`);
    passed++;
  } catch (e) {
    console.log(`FAILED: ${name}: ${e.message}`);
    failed++;
  } finally {
    await browser.close();
  }
}

await check("page loads and runs a WebGPU tensor program", ["--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader"], async (page, requests) => {
  await page.waitForFunction(() => window.__webgpuCheck !== undefined, null, { timeout: 120_000 });
  const result = await page.evaluate(() => window.__webgpuCheck);
  if (!result.ok) throw new Error(`WebGPU check failed: ${JSON.stringify(result)}`);
  const foreign = requests.filter((r) => !r.startsWith(url));
  if (foreign.length) throw new Error(`requests left the page's origin: ${foreign.join(", ")}`);
});

await check("without WebGPU the page says so", [], async (page) => {
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "error", null, { timeout: 60_000 });
  const text = await page.textContent("#status");
  if (!/WebGPU/.test(text)) throw new Error(`unexpected message: ${text}`);
});

server.close();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
