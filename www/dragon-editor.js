// <dragon-editor>: the whole editor as a custom element, used full-page by index.html and
// embeddable in other sites. Attributes: `model` (a manifest URL, or a base URL serving
// dragonedit-manifest.json), `resolution` (working resolution, default 512; `size` is an
// alias), `reuse-memory` (MiB of GPU memory kept after an edit so that the next edit of the
// same photo runs fewer UNet passes; default 256, 0 keeps only the photo's inversion). API:
// loadImage(blob), run(), cancel(), result() → Promise<Blob|null>, releaseMemory() (forget
// what was kept and give free GPU memory back). Events: `progress` {phase, step, total, eta},
// `preview` {step}, `result` {blob, width, height, reused: {inversion, featureSteps}},
// `error` {message}, `ready` {model}.
import { EngineClient, formatBytes, formatSeconds } from "./engine.js";
import { Sketch, canvasPng, readPhoto } from "./sketch.js";

const DEFAULT_MODEL = new URL("./models/sd15.json", import.meta.url).href;

const MODES = {
  drag: { label: "Content dragging", hint: "Add handle → target points (drag from a handle to where it should go). Paint the region that may change, or leave it empty for the whole photo." },
  move: { label: "Object moving", hint: "Paint the object, then drag an arrow from it to where it should go." },
  resize: { label: "Object resizing", hint: "Paint the object and set the scale; an arrow moves it too." },
  appearance: { label: "Appearance replacing", hint: "Paint the object to change, open a reference photo and paint the object whose look it should take." },
  paste: { label: "Object pasting", hint: "Open a reference photo and paint the object to paste; an arrow on your photo shifts it, the scale resizes it." },
  face_landmarks: { label: "Face-landmark dragging", hint: "Add handle → target pairs on facial landmarks (e.g. mouth corners)." },
};

// The edit spec's mode for a mode of the menu: resizing is moving with a scale.
const specMode = (mode) => (mode === "resize" ? "move" : mode);

const PHASES = {
  downloading: "Downloading the model",
  loading_weights: "Loading the model",
  encoding_prompt: "Reading the prompt",
  encoding_image: "Encoding the photo",
  inverting: "Inverting",
  editing: "Editing",
  decoding: "Decoding",
  sampling: "Sampling",
};

const TEMPLATE = `
<link rel="stylesheet" href="${new URL("./editor.css", import.meta.url).href}">
<div class="editor">
  <div class="status" role="status" aria-live="polite"><span class="message" data-state="busy">Starting…</span>
    <progress class="bar" max="1" value="0" hidden aria-label="Progress"></progress></div>
  <div class="notices" aria-live="polite"></div>
  <div class="toolbar" role="toolbar" aria-label="Editing tools">
    <label class="file">Open photo <input type="file" class="open" accept="image/*"></label>
    <label>Mode <select class="mode"></select></label>
    <button type="button" class="tool" data-tool="brush" aria-pressed="true" title="Mask brush (B)">Brush</button>
    <button type="button" class="tool" data-tool="eraser" aria-pressed="false" title="Eraser (E)">Eraser</button>
    <button type="button" class="tool" data-tool="points" aria-pressed="false" title="Points and arrows (P)">Points</button>
    <label>Brush size <input type="range" class="brush" min="4" max="96" value="24"></label>
    <button type="button" class="undo" title="Undo (Ctrl+Z)">Undo</button>
    <button type="button" class="redo" title="Redo (Ctrl+Shift+Z)">Redo</button>
    <button type="button" class="clear-mask">Clear mask</button>
    <button type="button" class="clear-points">Clear points</button>
  </div>
  <p class="hint"></p>
  <div class="workspace">
    <div class="stage" aria-label="Photo">
      <p class="drop">Drop a photo here, paste one, or use “Open photo”.</p>
    </div>
    <div class="side">
      <label class="scale-row" hidden>Scale <input type="range" class="scale" min="0.1" max="4" step="0.05" value="1"> <output class="scale-value">1.00</output></label>
      <div class="reference-panel" hidden>
        <label class="file">Open reference photo <input type="file" class="open-reference" accept="image/*"></label>
        <div class="stage reference" aria-label="Reference photo"></div>
        <label>Reference prompt <input type="text" class="reference-prompt" placeholder="optional"></label>
      </div>
      <label>Prompt <input type="text" class="prompt" placeholder="optional, e.g. a photo of a cup"></label>
      <details class="advanced"><summary>Advanced settings</summary>
        <label>Steps <input type="number" class="steps" min="1" max="1000" value="50"></label>
        <label>Seed <input type="number" class="seed" min="0" value="42"></label>
        <label>Working resolution <input type="number" class="resolution" min="64" max="1024" step="64" value="512"></label>
        <p class="strengths-hint">Empty fields take the mode's defaults, shown in grey.</p>
        <label title="Classifier-free guidance: how strongly the prompt steers every step">Prompt guidance <input type="number" class="s-guidance_scale" min="0" step="0.1" placeholder="default"></label>
        <label title="How strongly the edit steers each of the first steps (x1000)">Edit strength <input type="number" class="s-energy_scale" min="0" step="0.1" placeholder="default"></label>
        <label title="Weight of the pull that moves or drags what you marked (w_edit)">Edit weight <input type="number" class="s-w_edit" min="0" step="0.1" placeholder="default"></label>
        <label title="Weight of the pull that keeps the rest of the photo as it was (w_content)">Keep-the-rest weight <input type="number" class="s-w_content" min="0" step="0.1" placeholder="default"></label>
        <label title="Object moving: pushes the place the object left away from looking like it (w_contrast)">Vacated-area contrast <input type="number" class="s-w_contrast" min="0" step="0.1" placeholder="default"></label>
        <label title="Object moving: makes the place the object left look like the background; content dragging: pulls content away from the handle (w_inpaint)">Fill weight <input type="number" class="s-w_inpaint" min="0" step="0.1" placeholder="default"></label>
      </details>
      <div class="actions">
        <button type="button" class="run" disabled title="Run the edit (Ctrl+Enter)">Run edit</button>
        <button type="button" class="cancel" disabled title="Cancel (Esc)">Cancel</button>
      </div>
      <div class="actions">
        <button type="button" class="compare" aria-pressed="false" disabled title="Hold to see the photo before this edit (C)">Before / after</button>
        <button type="button" class="undo-edit" disabled>Undo edit</button>
        <button type="button" class="redo-edit" disabled>Redo edit</button>
        <a class="download" download="dragonedit.png" hidden>Download PNG</a>
      </div>
      <details class="storage"><summary>Storage</summary><ul class="models"></ul></details>
    </div>
  </div>
  <dialog class="license" aria-labelledby="license-title">
    <h2 id="license-title">Download the model?</h2>
    <p class="license-text"></p>
    <p>The files are kept in this browser so later visits work offline. Nothing you edit leaves your computer.</p>
    <div class="actions"><button type="button" class="accept">Accept the license and download</button>
    <button type="button" class="decline">Not now</button></div>
  </dialog>
</div>`;

class DragonEditor extends HTMLElement {
  static get observedAttributes() {
    return ["model", "reuse-memory"];
  }

  constructor() {
    super();
    this.attachShadow({ mode: "open" });
    this.shadowRoot.innerHTML = TEMPLATE;
    this.$ = (sel) => this.shadowRoot.querySelector(sel);
    this.history = [];
    this.position = -1;
    this.reference = null;
    this.running = false;
    this.ready = false;
    this.started = null;
  }

  get modelSource() {
    const value = this.getAttribute("model");
    return value ? new URL(value, document.baseURI).href : DEFAULT_MODEL;
  }

  // The attribute only sets the initial value; the user can change it in the advanced settings.
  get initialResolution() {
    return Number(this.getAttribute("resolution") ?? this.getAttribute("size")) || 512;
  }

  connectedCallback() {
    if (this.engine) return;
    const modeSelect = this.$(".mode");
    for (const [value, { label }] of Object.entries(MODES)) modeSelect.append(new Option(label, value));
    this.sketch = new Sketch(this.$(".stage"), { onChange: () => this.updateButtons(), label: "Photo with mask and points" });
    this.refSketch = new Sketch(this.$(".stage.reference"), { onChange: () => this.updateButtons(), label: "Reference photo with mask" });
    this.$(".resolution").value = String(this.initialResolution);
    this.wire();
    this.setMode("drag");
    this.start().catch((e) => this.report(e));
  }

  attributeChangedCallback(name, old, value) {
    if (!this.engine || old === value) return;
    if (name === "model") this.start().catch((e) => this.report(e));
    if (name === "reuse-memory") this.applyReuseMemory().catch((e) => this.report(e));
  }

  // The `reuse-memory` attribute, passed to the engine; a value that is not a number of MiB
  // gets the default, and a notice the first time it is seen (not again when a restarted
  // engine is configured).
  async applyReuseMemory() {
    const value = this.getAttribute("reuse-memory");
    let mib = value === null || value.trim() === "" ? null : Number(value);
    if (mib !== null && !(mib >= 0)) {
      if (this.badReuseMemory !== value) this.notice(`reuse-memory="${value}" is not a number of MiB (0 or more); keeping the default.`);
      this.badReuseMemory = value;
      mib = null;
    }
    await this.engine.request("configure", { keptFeaturesMiB: mib });
  }

  // Forgets the photo's inversion and what was kept for its next edit, and gives the GPU
  // memory that frees back to the browser: for a host page that hides the editor. The next
  // edit inverts the photo again. During an edit it takes effect when the edit ends.
  async releaseMemory() {
    if (this.engine) await this.engine.request("release");
  }

  // ----- status -----

  say(text, state = "busy") {
    const m = this.$(".message");
    m.textContent = text;
    m.dataset.state = state;
    if (state !== "busy") this.$(".bar").hidden = true;
  }

  notice(text) {
    const p = document.createElement("p");
    p.textContent = text;
    this.$(".notices").append(p);
  }

  fail(e) {
    const message = e instanceof Error ? e.message : String(e);
    this.say(message, "error");
    this.dispatchEvent(new CustomEvent("error", { detail: { message } }));
  }

  // An error for the user, unless it came from an engine that was lost: `recover` speaks for
  // those, once per loss.
  report(e) {
    if (!e?.lost) this.fail(e);
  }

  // The engine can run nothing more (its GPU device was lost, or its module crashed): start a
  // fresh one and load the model again, keeping the photo, its edits and the marks on it. A
  // loss while it starts, or before it has finished an edit in the minutes after, is not a
  // passing one (a driver that resets on every edit, say) and gets a message instead of another
  // restart; after hours of idling, one more restart is worth trying.
  async recover(e) {
    this.ready = false;
    this.updateButtons();
    const soon = performance.now() - (this.restartedAt ?? -Infinity) < 300_000;
    if (this.recovering || (this.restartUnproven && soon)) {
      this.fail(new Error(`${e.message} It happened again right after the editor restarted its engine, so the GPU cannot be used now. Download the result if you want to keep it, then reload the page, or restart the browser if that does not help.`));
      return;
    }
    this.recovering = true;
    this.restartUnproven = true;
    this.say("The editing engine stopped; starting it again…");
    this.engine.restart();
    try {
      await this.start();
      this.notice(`${e.message} The editor started its engine again and reloaded the model; your photo, its edits and your marks are kept. Run the edit again.`);
    } catch (err) {
      this.report(err);
    } finally {
      this.recovering = false;
      this.restartedAt = performance.now();
    }
  }

  progress(p) {
    const bar = this.$(".bar");
    bar.hidden = false;
    const fraction = p.total ? Math.min(1, p.step / p.total) : 0;
    bar.value = fraction;
    const phaseKey = `${p.phase}`;
    if (!this.started || this.started.phase !== phaseKey) this.started = { phase: phaseKey, at: performance.now(), from: fraction };
    const elapsed = (performance.now() - this.started.at) / 1000;
    const done = fraction - this.started.from;
    const eta = done > 0 ? (elapsed / done) * (1 - fraction) : Infinity;
    let text;
    if (p.phase === "downloading") {
      text = `${PHASES.downloading}: ${formatBytes(p.step)} of ${formatBytes(p.total)} at ${formatBytes(p.rate)}/s`;
    } else {
      text = `${PHASES[p.phase] ?? p.phase}: ${p.step} / ${p.total}`;
    }
    const etaText = formatSeconds(eta);
    this.say(etaText && fraction < 1 ? `${text}, about ${etaText} left` : text);
    this.dispatchEvent(new CustomEvent("progress", { detail: { ...p, eta } }));
  }

  // A latent-sized estimate of the result, drawn over the photo until the edit ends.
  async preview({ step, png }) {
    if (!this.running) return;
    const bitmap = await createImageBitmap(new Blob([png], { type: "image/png" }));
    if (!this.running) return bitmap.close();
    this.sketch.drawPhoto(bitmap);
    bitmap.close();
    this.$(".stage").dataset.preview = String(step);
    this.dispatchEvent(new CustomEvent("preview", { detail: { step } }));
  }

  // ----- model -----

  async start() {
    this.ready = false;
    this.updateButtons();
    if (!("gpu" in navigator)) {
      throw new Error("WebGPU is not available in this browser, so dragonedit cannot run here. Use a current Chrome or Edge (version 113 or later) on a computer with a GPU, or the dragonedit command-line tool.");
    }
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) {
      throw new Error("WebGPU is present but found no GPU adapter. Turn on hardware acceleration in the browser settings, or try Chrome or Edge on another computer.");
    }
    this.engine ??= new EngineClient({
      onProgress: (p) => this.progress(p),
      onNotice: (t) => this.notice(t),
      onPreview: (p) => this.preview(p),
      onLost: (e) => this.recover(e),
    });
    this.engine.request("defaults").then(({ strengths }) => {
      this.defaults = strengths;
      this.showDefaults();
    }, (e) => this.report(e));
    this.say("Checking the model…");
    const info = await this.engine.request("inspect", { source: this.modelSource });
    const need = info.manifest.requirements?.max_buffer_mib;
    if (need && adapter.limits.maxStorageBufferBindingSize < need * 1024 * 1024) {
      throw new Error(`This GPU lets a page use buffers of at most ${formatBytes(adapter.limits.maxStorageBufferBindingSize)}; ${info.manifest.name} needs ${need} MiB. A desktop GPU with Chrome or Edge would work.`);
    }
    if (!info.cached) await this.askAndDownload(info);
    this.say("Loading the model…");
    await this.applyReuseMemory();
    const { precision, convolutions, timings, maxResolution } = await this.engine.request("load", { source: this.modelSource });
    this.precision = precision;
    this.capResolution(maxResolution);
    this.ready = true;
    this.say(this.sketch.hasPhoto ? "Ready." : "Ready. Open a photo to start.", "ok");
    this.updateButtons();
    this.refreshStorage().catch((e) => this.report(e));
    this.dispatchEvent(new CustomEvent("ready", { detail: { model: info.manifest.name, precision, convolutions, timings, maxResolution } }));
  }

  // The GPU's largest buffer bounds the VAE's images: keep the field within what fits, so an
  // edit is not refused for its size after the user set everything up.
  capResolution(largest) {
    if (!(largest > 0)) return;
    const field = this.$(".resolution");
    const cap = Math.min(Number(field.max) || largest, largest);
    field.max = String(cap);
    if (Number(field.value) > cap) {
      field.value = String(cap);
      this.notice(`This GPU's buffers hold this model's images up to about ${cap} x ${cap} pixels, so the working resolution is ${cap}.`);
    }
  }

  askAndDownload(info) {
    const { manifest, missing, quota } = info;
    const dialog = this.$(".license");
    const license = manifest.license;
    const text = this.$(".license-text");
    text.textContent = `${manifest.name}: ${formatBytes(missing)} to download, once. ` +
      (license ? `It is licensed under ${license.name}; by downloading you accept its terms: ` : "");
    if (license?.url) {
      const a = document.createElement("a");
      a.href = license.url;
      a.target = "_blank";
      a.rel = "noopener";
      a.textContent = license.url;
      text.append(a);
    }
    return new Promise((resolve, reject) => {
      const accept = this.$(".accept");
      const decline = this.$(".decline");
      const close = () => {
        accept.onclick = decline.onclick = null;
        dialog.close();
      };
      decline.onclick = () => {
        close();
        reject(new Error("The model was not downloaded. Reload the page when you want to start."));
      };
      accept.onclick = async () => {
        close();
        try {
          if (quota && quota.quota - quota.usage < missing) {
            throw new Error(`The browser allows this site ${formatBytes(quota.quota - quota.usage)} more storage, but the model needs ${formatBytes(missing)}. Free disk space, or delete other sites' data, and reload.`);
          }
          await navigator.storage?.persist?.().catch(() => false);
          this.say("Downloading the model…");
          await this.engine.request("download", { source: this.modelSource });
          resolve();
        } catch (e) {
          reject(e);
        }
      };
      dialog.showModal();
      accept.focus();
    });
  }

  async refreshStorage() {
    const list = this.$(".models");
    const { models } = await this.engine.request("storage");
    list.replaceChildren();
    for (const m of models) {
      const li = document.createElement("li");
      li.textContent = `${m.name}: ${m.complete ? formatBytes(m.size) : "partly downloaded"} `;
      const del = document.createElement("button");
      del.type = "button";
      del.textContent = "Delete";
      del.setAttribute("aria-label", `Delete ${m.name} from this browser`);
      del.onclick = async () => {
        try {
          await this.engine.request("remove", { source: m.id });
        } catch (e) {
          this.report(e);
          return;
        }
        if (m.id === this.modelSource) {
          this.ready = false;
          this.updateButtons();
          this.say("The model was deleted from this browser; reload to download it again.", "ok");
        }
        this.refreshStorage().catch((e) => this.report(e));
      };
      li.append(del);
      list.append(li);
    }
    if (!models.length) list.textContent = "No models are stored.";
  }

  // ----- photos -----

  async loadImage(blob) {
    try {
      const { canvas, note } = await readPhoto(blob);
      this.history = [canvas];
      this.position = 0;
      this.sketch.setPhoto(canvas);
      this.$(".drop").hidden = true;
      this.$(".download").hidden = true;
      if (note) this.notice(note);
      if (this.ready) this.say("Ready.", "ok");
      this.updateButtons();
    } catch (e) {
      this.fail(e);
    }
  }

  async loadReference(blob) {
    try {
      const { canvas, note } = await readPhoto(blob);
      this.reference = canvas;
      this.refSketch.setPhoto(canvas);
      if (note) this.notice(note);
      this.updateButtons();
    } catch (e) {
      this.fail(e);
    }
  }

  get current() {
    return this.history[this.position] ?? null;
  }

  showPosition() {
    this.sketch.setPhoto(this.current);
    this.updateButtons();
  }

  // ----- edits -----

  setMode(mode) {
    this.mode = mode;
    this.$(".mode").value = mode;
    this.$(".hint").textContent = MODES[mode].hint;
    const scaled = mode === "resize" || mode === "paste";
    this.$(".scale-row").hidden = !scaled;
    const scale = this.$(".scale");
    scale.max = mode === "paste" ? "1.5" : "4";
    if (Number(scale.value) > Number(scale.max)) scale.value = scale.max;
    this.$(".scale-value").textContent = Number(scale.value).toFixed(2);
    this.$(".reference-panel").hidden = !(mode === "appearance" || mode === "paste");
    this.setTool(mode === "drag" || mode === "face_landmarks" ? "points" : "brush");
    this.showDefaults();
    this.updateButtons();
  }

  // Each strength field's placeholder is what the engine uses for this mode when it is empty.
  showDefaults() {
    const defaults = this.defaults?.[specMode(this.mode)];
    if (!defaults) return;
    for (const [key, value] of Object.entries(defaults)) {
      const input = this.$(`.s-${key}`);
      if (input) input.placeholder = String(value);
    }
  }

  setTool(tool) {
    this.sketch.tool = tool;
    this.refSketch.tool = tool === "points" ? "brush" : tool;
    for (const b of this.shadowRoot.querySelectorAll(".tool")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
  }

  // The edit spec and its files, or a message saying what is missing.
  async buildRequest() {
    const s = this.sketch;
    const pairs = s.photoPoints();
    const spec = { mode: specMode(this.mode) };
    const assets = {};
    const need = (ok, text) => {
      if (!ok) throw new Error(text);
    };
    need(s.hasPhoto, "Open a photo first.");
    const arrow = pairs[0] ?? { handle: [0, 0], target: [0, 0] };
    switch (this.mode) {
      case "drag":
        need(pairs.length > 0, "Add at least one handle → target point pair (Points tool: drag from a handle to its target).");
        assets["mask.png"] = await s.maskPng(s.maskIsEmpty());
        Object.assign(spec, { mask: "mask.png", points: pairs });
        break;
      case "face_landmarks":
        need(pairs.length > 0, "Add at least one handle → target pair on the face.");
        spec.points = pairs;
        break;
      case "move":
      case "resize":
        need(!s.maskIsEmpty(), "The mask is empty: paint the object to move with the brush.");
        need(this.mode === "resize" || pairs.length > 0, "Drag an arrow (Points tool) from the object to where it should go.");
        assets["mask.png"] = await s.maskPng();
        Object.assign(spec, { mask: "mask.png", from: arrow.handle, to: arrow.target, scale: this.mode === "resize" ? Number(this.$(".scale").value) : 1 });
        break;
      case "appearance":
      case "paste":
        need(this.reference, "Open a reference photo first.");
        need(!this.refSketch.maskIsEmpty(), "Paint the object on the reference photo.");
        assets["reference-mask.png"] = await this.refSketch.maskPng();
        spec.reference_mask = "reference-mask.png";
        if (this.$(".reference-prompt").value) spec.reference_prompt = this.$(".reference-prompt").value;
        if (this.mode === "appearance") {
          need(!s.maskIsEmpty(), "Paint the object whose appearance should change.");
          assets["mask.png"] = await s.maskPng();
          spec.mask = "mask.png";
        } else {
          spec.offset = [arrow.target[0] - arrow.handle[0], arrow.target[1] - arrow.handle[1]];
          spec.scale = Number(this.$(".scale").value);
        }
        break;
    }
    if (this.$(".prompt").value) spec.prompt = this.$(".prompt").value;
    spec.steps = Number(this.$(".steps").value) || 50;
    spec.seed = Number(this.$(".seed").value) || 0;
    spec.resolution = Number(this.$(".resolution").value) || 512;
    const strengths = {};
    for (const key of ["guidance_scale", "energy_scale", "w_edit", "w_content", "w_contrast", "w_inpaint"]) {
      const v = this.$(`.s-${key}`).value;
      if (v !== "") strengths[key] = Number(v);
    }
    if (Object.keys(strengths).length) spec.strengths = strengths;
    const image = await canvasPng(this.current);
    const reference = this.reference && (this.mode === "appearance" || this.mode === "paste") ? await canvasPng(this.reference) : null;
    return { spec: JSON.stringify(spec), image, reference, assets };
  }

  async run() {
    if (this.running || !this.ready) return;
    let request;
    try {
      request = await this.buildRequest();
    } catch (e) {
      this.fail(e);
      return;
    }
    this.running = true;
    this.updateButtons();
    this.say("Starting the edit…");
    const before = this.position;
    let failure = null;
    try {
      const { png, reused } = await this.engine.request("edit", request);
      const blob = new Blob([png], { type: "image/png" });
      const { canvas } = await readPhoto(blob, Infinity);
      this.history = this.history.slice(0, before + 1);
      this.history.push(canvas);
      this.position = this.history.length - 1;
      this.showPosition();
      this.setDownload(blob);
      this.restartUnproven = false;
      this.say("Done. Download the result, compare it with the photo before, or edit further.", "ok");
      this.dispatchEvent(new CustomEvent("result", { detail: { blob, width: canvas.width, height: canvas.height, reused } }));
    } catch (e) {
      this.sketch.drawPhoto(this.current);
      if (e.cancelled) this.say("Cancelled. The photo is unchanged.", "ok");
      else failure = e;
    } finally {
      this.running = false;
      delete this.$(".stage").dataset.preview;
      this.updateButtons();
    }
    if (failure) this.report(failure);
  }

  cancel() {
    if (!this.running) return;
    this.engine.cancel();
    this.say("Cancelling…");
  }

  setDownload(blob) {
    const a = this.$(".download");
    if (a.href) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(blob);
    a.hidden = false;
  }

  async result() {
    if (this.position < 1) return null;
    return new Promise((resolve) => this.current.toBlob(resolve, "image/png"));
  }

  updateButtons() {
    const has = this.sketch?.hasPhoto;
    this.$(".run").disabled = !this.ready || !has || this.running;
    this.$(".cancel").disabled = !this.running;
    this.$(".undo-edit").disabled = this.running || this.position < 1;
    this.$(".redo-edit").disabled = this.running || this.position >= this.history.length - 1;
    this.$(".compare").disabled = this.position < 1;
  }

  // ----- input -----

  wire() {
    const $ = this.$;
    $(".open").addEventListener("change", (e) => e.target.files[0] && this.loadImage(e.target.files[0]));
    $(".open-reference").addEventListener("change", (e) => e.target.files[0] && this.loadReference(e.target.files[0]));
    $(".mode").addEventListener("change", (e) => this.setMode(e.target.value));
    for (const b of this.shadowRoot.querySelectorAll(".tool")) b.addEventListener("click", () => this.setTool(b.dataset.tool));
    $(".brush").addEventListener("input", (e) => {
      this.sketch.brushSize = this.refSketch.brushSize = Number(e.target.value);
    });
    $(".scale").addEventListener("input", (e) => ($(".scale-value").textContent = Number(e.target.value).toFixed(2)));
    $(".undo").addEventListener("click", () => this.sketch.undo());
    $(".redo").addEventListener("click", () => this.sketch.redo());
    $(".clear-mask").addEventListener("click", () => this.sketch.clearMask());
    $(".clear-points").addEventListener("click", () => this.sketch.clearPoints());
    $(".run").addEventListener("click", () => this.run());
    $(".cancel").addEventListener("click", () => this.cancel());
    $(".undo-edit").addEventListener("click", () => {
      if (this.position > 0) this.position--;
      this.showPosition();
    });
    $(".redo-edit").addEventListener("click", () => {
      if (this.position < this.history.length - 1) this.position++;
      this.showPosition();
    });
    const compare = $(".compare");
    const show = (before) => {
      if (this.position < 1) return;
      compare.setAttribute("aria-pressed", String(before));
      this.sketch.drawPhoto(before ? this.history[this.position - 1] : this.current);
    };
    compare.addEventListener("pointerdown", () => show(true));
    for (const ev of ["pointerup", "pointerleave", "blur"]) compare.addEventListener(ev, () => show(false));
    const stage = $(".stage");
    stage.addEventListener("dragover", (e) => e.preventDefault());
    stage.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer?.files?.[0];
      if (file) this.loadImage(file);
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData?.items ?? [])].find((i) => i.kind === "file");
      if (item) this.loadImage(item.getAsFile());
    });
    this.addEventListener("keydown", (e) => {
      const origin = e.composedPath()[0];
      if (origin instanceof HTMLInputElement || origin instanceof HTMLSelectElement) return;
      const key = e.key.toLowerCase();
      if ((e.ctrlKey || e.metaKey) && key === "z") {
        e.shiftKey ? this.sketch.redo() : this.sketch.undo();
      } else if ((e.ctrlKey || e.metaKey) && key === "enter") {
        this.run();
      } else if (key === "escape") {
        this.cancel();
      } else if (key === "b") this.setTool("brush");
      else if (key === "e") this.setTool("eraser");
      else if (key === "p") this.setTool("points");
      else if (key === "c") show(true);
      else if (key === "delete" || key === "backspace") this.sketch.removeLastPoint();
      else if (key === "[" || key === "]") {
        const input = $(".brush");
        input.value = String(Number(input.value) + (key === "]" ? 4 : -4));
        input.dispatchEvent(new Event("input"));
      } else return;
      e.preventDefault();
    });
    this.addEventListener("keyup", (e) => e.key.toLowerCase() === "c" && show(false));
  }
}

customElements.define("dragon-editor", DragonEditor);
export { DragonEditor };
