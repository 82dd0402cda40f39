//! The browser shell's wasm-bindgen surface. It stays thin: the engine knows nothing of the page.
//! Every call is async and reads results back with `into_data_async` (synchronous read-back
//! panics on wasm, BURN.md §6).

use burn::tensor::{Device, Tensor, TensorData, module::conv2d, ops::ConvOptions};
use wasm_bindgen::prelude::*;

use crate::model::attention::AttentionPlan;

mod blob_source;
mod hash;
mod session;

#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The crate version, for the page footer.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Every mode's default strengths (ALGORITHM.md §8), as `{mode name: {guidance_scale, …}}`,
/// for the page to show beside the fields that override them.
#[wasm_bindgen]
pub fn default_strengths() -> Result<JsValue, JsValue> {
    use serde::Serialize;
    let defaults: std::collections::BTreeMap<_, _> = crate::edit::spec::ModeKind::ALL
        .iter()
        .map(|m| (m.name(), m.default_strengths()))
        .collect();
    defaults
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| JsValue::from_str(&e.to_string()))
}

thread_local! {
    static DEVICE: std::cell::RefCell<Option<Device>> = const { std::cell::RefCell::new(None) };
}

/// The WebGPU device if this page opened it already.
pub(crate) fn open_device() -> Option<Device> {
    DEVICE.with(|d| d.borrow().clone())
}

pub(crate) async fn device() -> Result<Device, JsValue> {
    if let Some(d) = open_device() {
        return Ok(d);
    }
    let d = crate::device::webgpu()
        .await
        .map_err(|e| JsValue::from_str(&e.to_string()))?;
    DEVICE.with(|slot| *slot.borrow_mut() = Some(d.clone()));
    Ok(d)
}

/// Runs a convolution, a matmul and chunked attention on WebGPU and returns a checksum the
/// page compares against the value computed on the CPU (`webgpu_check_expected`).
#[wasm_bindgen]
pub async fn webgpu_check() -> Result<f64, JsValue> {
    let device = device().await?;
    let values = check_graph(&device)
        .into_data_async()
        .await
        .map_err(|e| JsValue::from_str(&format!("read-back failed: {e:?}")))?
        .try_to_vec::<f32>()
        .map_err(|e| JsValue::from_str(&format!("{e:?}")))?;
    Ok(values.iter().map(|&v| f64::from(v)).sum())
}

/// The same checksum computed in plain Rust, for comparison.
#[wasm_bindgen]
pub fn webgpu_check_expected() -> f64 {
    check_reference()
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i % 7) as f32 - 3.0) * scale).collect()
}

/// conv 3x3 (1→2 channels) on a 4x4 image, then attention over the 2x16 result.
fn check_graph(device: &Device) -> Tensor<4> {
    let x = Tensor::<4>::from_data(TensorData::new(ramp(16, 0.1), [1, 1, 4, 4]), device);
    let w = Tensor::<4>::from_data(TensorData::new(ramp(18, 0.2), [2, 1, 3, 3]), device);
    let y = conv2d(x, w, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
    let tokens = y.reshape([1, 1, 2, 16]);
    AttentionPlan::default().attend(tokens.clone(), tokens.clone(), tokens, false)
}

fn check_reference() -> f64 {
    let x = ramp(16, 0.1);
    let w = ramp(18, 0.2);
    let mut y = [0f32; 32];
    for o in 0..2 {
        for r in 0..4i32 {
            for c in 0..4i32 {
                let mut acc = 0f32;
                for kr in 0..3i32 {
                    for kc in 0..3i32 {
                        let (ir, ic) = (r + kr - 1, c + kc - 1);
                        if (0..4).contains(&ir) && (0..4).contains(&ic) {
                            acc += x[(ir * 4 + ic) as usize] * w[o * 9 + (kr * 3 + kc) as usize];
                        }
                    }
                }
                y[o * 16 + (r * 4 + c) as usize] = acc;
            }
        }
    }
    let scale = 1.0 / 4.0f32; // 1/sqrt(16)
    let mut total = 0f64;
    for q in 0..2 {
        let scores: Vec<f32> = (0..2)
            .map(|k| (0..16).map(|d| y[q * 16 + d] * y[k * 16 + d]).sum::<f32>() * scale)
            .collect();
        let m = scores.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f32 = e.iter().sum();
        for d in 0..16 {
            total += f64::from((0..2).map(|k| e[k] / z * y[k * 16 + d]).sum::<f32>());
        }
    }
    total
}
