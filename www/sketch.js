// One photo with what the user marks on it: a mask (brush and eraser) and handle → target point
// pairs, drawn on stacked canvases at the working resolution. Exports the mask and the points
// at the photo's own size, which is what the engine's edit spec takes.

const HIT_RADIUS = 12;

// The working size of ALGORITHM.md §1.2 (area about r², sides multiples of 64), as the engine
// computes it, so what the user sees is what the engine edits.
export function workingSize(w0, h0, r = 512) {
  const k = Math.sqrt((r * r) / (w0 * h0));
  const round = (v) => Math.max(64, Math.round((v * k) / 64) * 64);
  return [round(w0), round(h0)];
}

export class Sketch {
  constructor(root, { onChange, label }) {
    this.root = root;
    this.onChange = onChange ?? (() => {});
    this.photoCanvas = this.layer("photo");
    this.maskCanvas = this.layer("mask");
    this.overlay = this.layer("overlay");
    this.overlay.tabIndex = 0;
    this.overlay.setAttribute("role", "img");
    this.overlay.setAttribute("aria-label", label);
    this.tool = "brush";
    this.brushSize = 24;
    this.points = [];
    this.photo = null;
    this.undoStack = [];
    this.redoStack = [];
    this.drag = null;
    this.overlay.addEventListener("pointerdown", (e) => this.down(e));
    this.overlay.addEventListener("pointermove", (e) => this.move(e));
    this.overlay.addEventListener("pointerup", (e) => this.up(e));
    this.overlay.addEventListener("pointercancel", (e) => this.up(e));
    this.overlay.addEventListener("contextmenu", (e) => e.preventDefault());
  }

  layer(name) {
    const c = document.createElement("canvas");
    c.className = `layer ${name}`;
    this.root.append(c);
    return c;
  }

  // Shows `photo` (a canvas at the photo's size) and clears the marks.
  setPhoto(photo) {
    this.photo = photo;
    const [w, h] = workingSize(photo.width, photo.height);
    for (const c of [this.photoCanvas, this.maskCanvas, this.overlay]) {
      c.width = w;
      c.height = h;
    }
    this.root.style.aspectRatio = `${w} / ${h}`;
    // Tall photos: keep the whole photo within the window's height.
    this.root.style.maxWidth = `calc(80vh * ${w} / ${h})`;
    this.drawPhoto(photo);
    this.points = [];
    this.undoStack = [];
    this.redoStack = [];
    this.redraw();
  }

  // Replaces the shown pixels (a result, or the original for comparison) keeping the marks.
  drawPhoto(source) {
    const ctx = this.photoCanvas.getContext("2d");
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(source, 0, 0, this.photoCanvas.width, this.photoCanvas.height);
  }

  get hasPhoto() {
    return this.photo !== null;
  }

  snapshot() {
    const ctx = this.maskCanvas.getContext("2d");
    return {
      mask: ctx.getImageData(0, 0, this.maskCanvas.width, this.maskCanvas.height),
      points: JSON.parse(JSON.stringify(this.points)),
    };
  }

  restore(state) {
    this.maskCanvas.getContext("2d").putImageData(state.mask, 0, 0);
    this.points = state.points;
    this.redraw();
    this.onChange();
  }

  remember() {
    if (!this.hasPhoto) return;
    this.undoStack.push(this.snapshot());
    if (this.undoStack.length > 100) this.undoStack.shift();
    this.redoStack = [];
  }

  undo() {
    if (!this.undoStack.length) return false;
    this.redoStack.push(this.snapshot());
    this.restore(this.undoStack.pop());
    return true;
  }

  redo() {
    if (!this.redoStack.length) return false;
    this.undoStack.push(this.snapshot());
    this.restore(this.redoStack.pop());
    return true;
  }

  clearMask() {
    this.remember();
    this.maskCanvas.getContext("2d").clearRect(0, 0, this.maskCanvas.width, this.maskCanvas.height);
    this.onChange();
  }

  clearPoints() {
    this.remember();
    this.points = [];
    this.redraw();
    this.onChange();
  }

  removeLastPoint() {
    if (!this.points.length) return;
    this.remember();
    this.points.pop();
    this.redraw();
    this.onChange();
  }

  pos(e) {
    const r = this.overlay.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * this.overlay.width, ((e.clientY - r.top) / r.height) * this.overlay.height];
  }

  // Canvas pixels per CSS pixel: brush sizes and hit radii are given in CSS pixels.
  pixelScale() {
    return this.overlay.width / Math.max(1, this.overlay.getBoundingClientRect().width);
  }

  hit(p) {
    const scale = this.pixelScale();
    let best = null;
    this.points.forEach((pair, i) => {
      for (const end of ["handle", "target"]) {
        const d = Math.hypot(pair[end][0] - p[0], pair[end][1] - p[1]);
        if (d <= HIT_RADIUS * scale && (!best || d < best.d)) best = { i, end, d };
      }
    });
    return best;
  }

  down(e) {
    if (!this.hasPhoto || (e.button !== 0 && e.button !== 2)) return;
    e.preventDefault();
    this.overlay.setPointerCapture(e.pointerId);
    this.overlay.focus();
    const p = this.pos(e);
    if (this.tool === "points") {
      const hit = this.hit(p);
      this.remember();
      if (hit && (e.button === 2 || e.altKey)) {
        this.points.splice(hit.i, 1);
        this.drag = null;
      } else if (hit) {
        this.drag = { kind: "point", ...hit };
      } else {
        this.points.push({ handle: p, target: p });
        this.drag = { kind: "point", i: this.points.length - 1, end: "target" };
      }
      this.redraw();
      this.onChange();
      return;
    }
    this.remember();
    this.drag = { kind: "paint", last: p, erase: this.tool === "eraser" || e.button === 2 };
    this.paint(p, p);
  }

  move(e) {
    if (!this.drag) return;
    const p = this.pos(e);
    if (this.drag.kind === "point") {
      this.points[this.drag.i][this.drag.end] = p;
      this.redraw();
    } else {
      this.paint(this.drag.last, p);
      this.drag.last = p;
    }
  }

  up() {
    if (!this.drag) return;
    this.drag = null;
    this.onChange();
  }

  paint(a, b) {
    const ctx = this.maskCanvas.getContext("2d");
    const scale = this.pixelScale();
    ctx.globalCompositeOperation = this.drag.erase ? "destination-out" : "source-over";
    ctx.strokeStyle = "rgb(255, 40, 80)";
    ctx.lineWidth = this.brushSize * scale;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(a[0], a[1]);
    ctx.lineTo(b[0], b[1]);
    ctx.stroke();
  }

  redraw() {
    const ctx = this.overlay.getContext("2d");
    ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
    const r = Math.max(4, this.overlay.width / 100);
    for (const { handle, target } of this.points) {
      ctx.strokeStyle = "white";
      ctx.lineWidth = r / 2;
      ctx.beginPath();
      ctx.moveTo(handle[0], handle[1]);
      ctx.lineTo(target[0], target[1]);
      ctx.stroke();
      const dot = (p, color) => {
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.arc(p[0], p[1], r, 0, 2 * Math.PI);
        ctx.fill();
        ctx.stroke();
      };
      dot(handle, "#e0245e");
      dot(target, "#1d9bf0");
    }
  }

  // True when the mask has any painted pixel.
  maskIsEmpty() {
    const data = this.maskCanvas.getContext("2d").getImageData(0, 0, this.maskCanvas.width, this.maskCanvas.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return false;
    return true;
  }

  // The mask as PNG bytes at the photo's size (white = selected), or the whole photo when
  // `fill` is set.
  async maskPng(fill = false) {
    const { width, height } = this.photo;
    const out = new OffscreenCanvas(width, height);
    const ctx = out.getContext("2d");
    ctx.fillStyle = "black";
    ctx.fillRect(0, 0, width, height);
    if (fill) {
      ctx.fillStyle = "white";
      ctx.fillRect(0, 0, width, height);
    } else {
      const tmp = new OffscreenCanvas(width, height);
      const t = tmp.getContext("2d");
      t.drawImage(this.maskCanvas, 0, 0, width, height);
      const img = t.getImageData(0, 0, width, height);
      for (let i = 0; i < img.data.length; i += 4) {
        const on = img.data[i + 3] >= 128 ? 255 : 0;
        img.data[i] = img.data[i + 1] = img.data[i + 2] = on;
        img.data[i + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
    }
    return new Uint8Array(await (await out.convertToBlob({ type: "image/png" })).arrayBuffer());
  }

  // Point pairs in the photo's pixels.
  photoPoints() {
    const sx = this.photo.width / this.overlay.width;
    const sy = this.photo.height / this.overlay.height;
    const at = (p) => [Math.round(p[0] * sx * 10) / 10, Math.round(p[1] * sy * 10) / 10];
    return this.points.map(({ handle, target }) => ({ handle: at(handle), target: at(target) }));
  }
}

// Reads an image file (any format the browser decodes, EXIF orientation applied) into a
// canvas, scaled down when its long side exceeds `maxSide`. Throws a readable error for files
// that are not images.
export async function readPhoto(blob, maxSide = 2048) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
  } catch {
    throw new Error(`${blob.name ?? "this file"} is not an image the browser can open; choose a PNG, JPEG or WebP photo`);
  }
  const k = Math.min(1, maxSide / Math.max(bitmap.width, bitmap.height));
  const w = Math.max(1, Math.round(bitmap.width * k));
  const h = Math.max(1, Math.round(bitmap.height * k));
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, w, h);
  const note = k < 1 ? `The photo is ${bitmap.width}x${bitmap.height}; it was scaled to ${w}x${h} (edits run at about 512x512 anyway).` : "";
  bitmap.close();
  return { canvas, note };
}

export async function canvasPng(canvas) {
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  return new Uint8Array(await blob.arrayBuffer());
}
