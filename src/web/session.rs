//! The engine as the worker sees it: one loaded model per worker, edits run against it. Calls
//! are async (every GPU read-back is awaited), so the worker's event loop runs between steps and
//! a cancel message is seen at the next step.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::tensor::{DType, Device};
use serde::Serialize;
use wasm_bindgen::prelude::*;

use super::blob_source::BlobFolder;
use crate::StableDiffusion;
use crate::edit::{EditSpec, Editor, EngineOptions, InversionCache, Preview};
use crate::error::Error;
use crate::model::config::UnetConfig;
use crate::model::conv::{ConvStrategy, set_conv_strategy};
use crate::model::conv_choice::{ConvTimings, time_convolutions};
use crate::model::folder::{ModelSource, layout};
use crate::progress::Progress;

thread_local! {
    static MODEL: RefCell<Option<Rc<StableDiffusion>>> = const { RefCell::new(None) };
    /// The last edit's inversion: a second edit of the same photo skips it.
    static INVERSION: RefCell<InversionCache> = RefCell::new(tab_cache());
    /// The device bytes of reference features kept between edits (`set_kept_features_mib`).
    static FEATURE_BUDGET: Cell<usize> = const { Cell::new(DEFAULT_KEPT_FEATURES_MIB << 20) };
    /// Set by `release_memory`; an edit running then (it has the cache out of `INVERSION`)
    /// drops its cache when it ends. Each edit clears it as it starts.
    static RELEASE_AFTER_EDIT: Cell<bool> = const { Cell::new(false) };
}

/// The reference features a tab keeps for the next edit of the same photo unless the page
/// says otherwise. A 512 px edit's pool peaked at 3178 MiB in the browser's layout with none
/// kept, against a 4 GiB target; 256 MiB (more with the pool's size buckets) keeps every
/// guided step of a 30-step edit without a reference image (7.5 MiB each in f16) and about
/// half of one with.
const DEFAULT_KEPT_FEATURES_MIB: usize = 256;

/// An empty inversion cache that keeps to the tab's feature budget.
fn tab_cache() -> InversionCache {
    InversionCache::with_feature_budget(FEATURE_BUDGET.get())
}

/// Sets how many MiB of device memory the reference features kept for the next edit of the
/// same photo may hold (each guided step they cover runs one truncated UNet pass less), and
/// drops at once what the kept ones hold past it. 0 keeps none; the inversion itself (a few
/// MiB of latents) is kept whatever the budget. `undefined` restores the default (256). An
/// edit running now keeps to it from its end.
#[wasm_bindgen]
pub fn set_kept_features_mib(mib: Option<u32>) {
    let mib = mib.map_or(DEFAULT_KEPT_FEATURES_MIB, |m| m as usize);
    let bytes = mib.saturating_mul(1 << 20);
    FEATURE_BUDGET.set(bytes);
    INVERSION.with(|c| c.borrow_mut().set_feature_budget(bytes));
}

/// Forgets the kept inversion and reference features and hands the device's free buffers
/// back to the browser, for a page that hides the editor or needs the GPU for itself. The
/// next edit of the same photo inverts it again. Called while an edit runs, it takes effect
/// when that edit ends.
#[wasm_bindgen]
pub fn release_memory() {
    INVERSION.with(|c| c.borrow_mut().clear());
    RELEASE_AFTER_EDIT.set(true);
    if let Some(device) = super::open_device() {
        crate::device::release_unused(&device);
    }
}

/// The engine's error as a JS `Error`; a lost GPU device's is named `DeviceLostError`, which
/// tells the page to start the engine again rather than to retry.
fn js_error(e: Error) -> JsValue {
    let error = js_sys::Error::new(&e.to_string());
    if matches!(e, Error::DeviceLost(_)) {
        error.set_name("DeviceLostError");
    }
    error.into()
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

/// What `load_model` tells the page.
#[derive(Serialize)]
struct Loaded {
    /// "f16" where the adapter has `shader-f16` (half the memory of f32), else "f32".
    precision: &'static str,
    /// "im2col + matmul" or "direct": how the model's convolutions run.
    convolutions: &'static str,
    /// The timings that chose it; absent where timing failed (burn's kernel is kept then).
    timings: Option<ConvTimings>,
    /// The largest square working resolution this GPU's buffers hold for this model, up to
    /// [`MAX_SIDE`] (0 where none does).
    #[serde(rename = "maxResolution")]
    max_resolution: usize,
}

/// The largest working resolution the page offers: photos are scaled to 2048 px at most.
const MAX_SIDE: usize = 2048;

/// Loads the model from `files` (a `Map` of folder path → Blob), tensor by tensor, onto the
/// WebGPU device, and returns `{precision, convolutions, timings, maxResolution}` (see
/// [`Loaded`]). Before loading, it times a convolution of the model's first block both ways on
/// this GPU and loads every convolution the faster way. Replaces any model loaded before.
#[wasm_bindgen]
pub async fn load_model(
    files: js_sys::Map,
    on_progress: js_sys::Function,
) -> Result<JsValue, JsValue> {
    let device = super::device().await?;
    let dtype = if device.supports_dtype(DType::F16) {
        DType::F16
    } else {
        DType::F32
    };
    let mut folder = BlobFolder::from_map(&files).map_err(js_error)?;
    MODEL.with(|m| m.borrow_mut().take());
    INVERSION.with(|c| c.borrow_mut().clear());
    let timings = match time_first_block(&mut folder, &device, dtype).await {
        Ok(t) => {
            if !t.gemm_is_accurate() {
                web_sys::console::warn_1(
                    &format!(
                        "dragonedit: im2col + matmul computed another convolution on this GPU \
                         (error {:.1e} against f32, burn's kernel {:.1e}); using burn's kernel",
                        t.gemm_error, t.direct_error
                    )
                    .into(),
                );
            }
            Some(t)
        }
        Err(e) => {
            web_sys::console::warn_1(
                &format!("dragonedit: could not time the convolutions ({e}); using burn's").into(),
            );
            None
        }
    };
    let strategy = timings.map_or(ConvStrategy::Direct, |t| t.faster());
    set_conv_strategy(strategy);
    let sd = StableDiffusion::load(&mut folder, &device, dtype, &mut progress_fn(on_progress))
        .map_err(js_error)?;
    let loaded = Loaded {
        precision: if dtype == DType::F16 { "f16" } else { "f32" },
        convolutions: if strategy == ConvStrategy::Gemm {
            "im2col + matmul"
        } else {
            "direct"
        },
        timings,
        max_resolution: sd.largest_square_side(MAX_SIDE),
    };
    MODEL.with(|m| *m.borrow_mut() = Some(Rc::new(sd)));
    serde_wasm_bindgen::to_value(&loaded).map_err(|e| JsValue::from_str(&e.to_string()))
}

/// A 3x3 convolution at the width of the UNet's first block, over a CFG pair of 512 px
/// latents (64x64): the UNet's and the VAE's most frequent heavy shape.
async fn time_first_block(
    folder: &mut BlobFolder,
    device: &Device,
    dtype: DType,
) -> crate::Result<ConvTimings> {
    let config = UnetConfig::parse(layout::UNET_CONFIG, &folder.read_text(layout::UNET_CONFIG)?)?;
    let channels = config.block_out_channels.first().copied().unwrap_or(320);
    time_convolutions(device, dtype, channels, (64, 64), 3).await
}

/// True once a model is loaded.
#[wasm_bindgen]
pub fn model_loaded() -> bool {
    MODEL.with(|m| m.borrow().is_some())
}

/// Runs one edit. `spec` is the edit spec JSON (the CLI's format); `image` and `reference` are
/// PNG or JPEG bytes; `assets` maps the spec's mask names to PNG bytes. `on_preview(step, png)`
/// gets a latent-sized preview about every tenth of the steps. Returns `{png, reusedInversion,
/// reusedFeatureSteps}`: the result as PNG bytes at the photo's own size, whether the photo's
/// inversion came from the edit before, and how many guided steps took their reference
/// features from it.
#[wasm_bindgen]
pub async fn run_edit(
    spec: String,
    image: Vec<u8>,
    reference: Option<Vec<u8>>,
    assets: js_sys::Map,
    on_progress: js_sys::Function,
    on_preview: Option<js_sys::Function>,
) -> Result<JsValue, JsValue> {
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
    // What is left in its place (should the edit never finish) keeps to the budget too.
    let mut cache = INVERSION.with(|c| std::mem::replace(&mut *c.borrow_mut(), tab_cache()));
    let (hits, feature_hits) = (cache.hits(), cache.feature_hits());
    RELEASE_AFTER_EDIT.set(false);
    let out = editor
        .run_reusing(
            &edit,
            &mut cache,
            None,
            &mut progress_fn(on_progress),
            Some(&mut preview),
        )
        .await;
    let reused = (cache.hits() > hits, cache.feature_hits() - feature_hits);
    if RELEASE_AFTER_EDIT.take() {
        cache.clear();
        crate::device::release_unused(sd.device());
    } else {
        // The page may have changed the budget while the edit ran.
        cache.set_feature_budget(FEATURE_BUDGET.get());
    }
    INVERSION.with(|c| *c.borrow_mut() = cache);
    let out = out.map_err(js_error)?;
    let (w, h) = photo.dimensions();
    let png =
        crate::image::encode_png(&crate::image::resized(&out.image, w, h)).map_err(js_error)?;
    edited(&png, reused.0, reused.1)
}

/// `run_edit`'s answer as a JS object.
fn edited(
    png: &[u8],
    reused_inversion: bool,
    reused_feature_steps: usize,
) -> Result<JsValue, JsValue> {
    let out = js_sys::Object::new();
    let set =
        |key: &str, value: JsValue| js_sys::Reflect::set(&out, &JsValue::from_str(key), &value);
    set("png", js_sys::Uint8Array::from(png).into())?;
    set("reusedInversion", JsValue::from_bool(reused_inversion))?;
    set(
        "reusedFeatureSteps",
        JsValue::from(reused_feature_steps as u32),
    )?;
    Ok(out.into())
}
