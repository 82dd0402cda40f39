// Serves the built site and, under /models/NAME/, local diffusers model folders with a
// generated dragonedit-manifest.json (sizes and SHA-256), with HTTP Range support. Used by
// scripts/serve.sh and by the browser tests, which also read its request log and switch on
// faults: a connection dropped or stalled part-way through a file, a file served corrupted, or
// every connection closed unanswered (`state.offline`).
//
//   node scripts/site-server.mjs DIST_DIR [--port 8080] [--model NAME=DIR ...]
import { createReadStream } from "node:fs";
import { createServer } from "node:http";
import { createHash } from "node:crypto";
import { access, readFile } from "node:fs/promises";
import { extname, join, normalize } from "node:path";
import { pathToFileURL } from "node:url";

const TYPES = {
  ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
  ".css": "text/css", ".json": "application/json", ".png": "image/png", ".txt": "text/plain",
};

const SMALL_FILES = [
  "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
  "tokenizer/vocab.json", "tokenizer/merges.txt",
];
// Per component, the weight file to offer: the fp16 variant first (half the download).
const WEIGHT_CHOICES = [
  ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"],
  ["vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"],
  ["text_encoder/model.fp16.safetensors", "text_encoder/model.safetensors"],
];

async function exists(path) {
  return access(path).then(() => true, () => false);
}

function sha256(path) {
  return new Promise((resolve, reject) => {
    const hash = createHash("sha256");
    let size = 0;
    createReadStream(path)
      .on("data", (d) => {
        hash.update(d);
        size += d.length;
      })
      .on("end", () => resolve({ size, sha256: hash.digest("hex") }))
      .on("error", reject);
  });
}

export async function manifestFor(name, dir) {
  const paths = [...SMALL_FILES];
  for (const choices of WEIGHT_CHOICES) {
    const found = [];
    for (const c of choices) if (await exists(join(dir, c))) found.push(c);
    if (!found.length) throw new Error(`${dir} has none of ${choices.join(", ")}`);
    paths.push(found[0]);
  }
  const files = [];
  for (const path of paths) files.push({ path, ...(await sha256(join(dir, path))) });
  return { name, files };
}

export async function startServer({ dist, models = {}, port = 0, licenses = {} }) {
  const manifests = {};
  for (const [name, dir] of Object.entries(models)) {
    manifests[name] = JSON.stringify({ ...(await manifestFor(name, dir)), license: licenses[name] });
  }
  const state = { log: [], faults: [], offline: false };
  const server = createServer(async (req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^(\.\.[/\\])+/, "");
    state.log.push({ path, range: req.headers.range ?? null, offline: state.offline });
    if (state.offline) {
      // As if the network were down: the connection closes with no answer.
      req.socket.destroy();
      return;
    }
    let file;
    const m = /^\/models\/([^/]+)\/(.*)$/.exec(path);
    if (m && models[m[1]]) {
      if (m[2] === "dragonedit-manifest.json") {
        res.writeHead(200, { "content-type": "application/json" });
        res.end(manifests[m[1]]);
        return;
      }
      file = join(models[m[1]], m[2]);
    } else {
      file = join(dist, path.endsWith("/") ? `${path}index.html` : path);
    }
    let body;
    try {
      body = await readFile(file);
    } catch {
      res.writeHead(404);
      res.end();
      return;
    }
    const fault = state.faults.find((f) => f.path === path && f.times > 0);
    if (fault) {
      fault.times--;
      if (fault.kind === "corrupt") {
        body = Buffer.from(body);
        body[body.length >> 1] ^= 0xff;
      }
    }
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    const start = range ? Number(range[1]) : 0;
    if (start > body.length) {
      res.writeHead(416, { "content-range": `bytes */${body.length}` });
      res.end();
      return;
    }
    const part = body.subarray(start);
    const headers = { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "content-length": part.length, "accept-ranges": "bytes" };
    if (range) headers["content-range"] = `bytes ${start}-${body.length - 1}/${body.length}`;
    res.writeHead(range ? 206 : 200, headers);
    if (fault?.kind === "drop") {
      res.write(part.subarray(0, fault.bytes), () => setTimeout(() => res.socket.destroy(), 50));
      return;
    }
    if (fault?.kind === "stall") {
      // Send part of the file, then nothing: the browser is closed meanwhile.
      res.write(part.subarray(0, fault.bytes));
      return;
    }
    res.end(part);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", resolve);
  });
  return { server, state, url: `http://127.0.0.1:${server.address().port}` };
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = process.argv.slice(2);
  const dist = args.shift();
  let port = 8080;
  const models = {};
  while (args.length) {
    const flag = args.shift();
    if (flag === "--port") port = Number(args.shift());
    else if (flag === "--model") {
      const [name, dir] = args.shift().split("=");
      models[name] = dir;
    } else throw new Error(`unknown argument ${flag}`);
  }
  if (Object.keys(models).length) console.log("hashing the model files for their manifest…");
  const { url } = await startServer({ dist, models, port });
  console.log(`serving ${dist} on ${url}/`);
  for (const name of Object.keys(models)) console.log(`model ${name}: ${url}/?model=/models/${name}/`);
}
