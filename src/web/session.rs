//! The engine as the worker sees it: one loaded model per worker, edits run against it. Calls
//! are async (every GPU read-back is awaited), so the worker's event loop runs between steps and
//! a cancel message is seen at the next step.

use std::cell::RefCell;
use std::rc::Rc;

use burn::tensor::DType;
use wasm_bindgen::prelude::*;

use super::blob_source::BlobFolder;
use crate::StableDiffusion;
use crate::edit::{EditSpec, Editor, EngineOptions, InversionCache, Preview};
use crate::error::Error;
use crate::progress::Progress;

thread_local! {
    static MODEL: RefCell<Option<Rc<StableDiffusion>>> = const { RefCell::new(None) };
    /// The last edit's inversion: a second edit of the same photo skips it.
    static INVERSION: RefCell<InversionCache> = RefCell::new(InversionCache::default());
}

fn js_error(e: Error) -> JsValue {
    js_sys::Error::new(&e.to_string()).into()
}

/// Calls `on_progress({phase, step, total})`; a `false` return cancels.
fn progress_fn(on_progress: js_sys::Function) -> impl FnMut(Progress) -> bool {
    move |p| {
        let Ok(report) = serde_wasm_bindgen::to_value(&p) else {
            return true;
        };
        on_progress
            .call1(&JsValue::NULL, &report)
            .map(|r| r.as_bool() != Some(false))
            .unwrap_or(true)
    }
}

/// Loads the model from `files` (a `Map` of folder path → Blob), tensor by tensor, onto the
/// WebGPU device, and returns the precision it computes in: "f16" where the adapter has
/// `shader-f16` (half the memory of f32 weights and activations), else
/// "f32". Replaces any model loaded before.
#[wasm_bindgen]
pub async fn load_model(
    files: js_sys::Map,
    on_progress: js_sys::Function,
) -> Result<String, JsValue> {
    let device = super::device().await?;
    let dtype = if device.supports_dtype(DType::F16) {
        DType::F16
    } else {
        DType::F32
    };
    let mut folder = BlobFolder::from_map(&files).map_err(js_error)?;
    MODEL.with(|m| m.borrow_mut().take());
    INVERSION.with(|c| c.borrow_mut().clear());
    let sd = StableDiffusion::load(&mut folder, &device, dtype, &mut progress_fn(on_progress))
        .map_err(js_error)?;
    MODEL.with(|m| *m.borrow_mut() = Some(Rc::new(sd)));
    Ok(if dtype == DType::F16 { "f16" } else { "f32" }.to_string())
}

/// True once a model is loaded.
#[wasm_bindgen]
pub fn model_loaded() -> bool {
    MODEL.with(|m| m.borrow().is_some())
}

/// Runs one edit. `spec` is the edit spec JSON (the CLI's format); `image` and `reference` are
/// PNG or JPEG bytes; `assets` maps the spec's mask names to PNG bytes. `on_preview(step, png)`
/// gets a latent-sized preview about every tenth of the steps. Returns the result as PNG bytes
/// at the photo's own size.
#[wasm_bindgen]
pub async fn run_edit(
    spec: String,
    image: Vec<u8>,
    reference: Option<Vec<u8>>,
    assets: js_sys::Map,
    on_progress: js_sys::Function,
    on_preview: Option<js_sys::Function>,
) -> Result<Vec<u8>, JsValue> {
    let sd = MODEL
        .with(|m| m.borrow().clone())
        .ok_or_else(|| js_error(Error::InvalidInput("no model is loaded yet".into())))?;
    let spec = EditSpec::from_json(&spec).map_err(js_error)?;
    let photo = crate::image::decode(&image).map_err(js_error)?;
    let reference = reference
        .as_deref()
        .map(crate::image::decode)
        .transpose()
        .map_err(js_error)?;
    let edit = spec
        .resolve(photo.clone(), reference, &mut |name| {
            let bytes = assets.get(&JsValue::from_str(name));
            if bytes.is_undefined() {
                return Err(Error::Spec(format!("no mask named {name:?} was sent")));
            }
            Ok(js_sys::Uint8Array::new(&bytes).to_vec())
        })
        .map_err(js_error)?;
    let editor = Editor::new(&sd, EngineOptions::default());
    let mut show = |step: usize, img: ::image::RgbImage| {
        let (Some(f), Ok(png)) = (&on_preview, crate::image::encode_png(&img)) else {
            return;
        };
        let bytes = js_sys::Uint8Array::from(png.as_slice());
        // A failing preview callback must not stop the edit.
        let _ = f.call2(&JsValue::NULL, &JsValue::from(step as u32), &bytes);
    };
    let mut preview = Preview {
        every: (edit.steps / 10).max(1),
        show: &mut show,
    };
    // Taken out for the edit (it is awaited across steps) and put back after, whatever the
    // outcome; the worker runs one edit at a time.
    let mut cache = INVERSION.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let out = editor
        .run_reusing(
            &edit,
            &mut cache,
            None,
            &mut progress_fn(on_progress),
            Some(&mut preview),
        )
        .await;
    INVERSION.with(|c| *c.borrow_mut() = cache);
    let out = out.map_err(js_error)?;
    let (w, h) = photo.dimensions();
    crate::image::encode_png(&crate::image::resized(&out.image, w, h)).map_err(js_error)
}
