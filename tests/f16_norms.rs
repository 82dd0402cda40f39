//! The norms in f16 at SD 1.5's sizes: their statistics must not overflow f16. A 64x64 group
//! of 10 channels sums 40960 squares, past f16's largest value (65504) once their mean square
//! passes 1.6, which SD's activations do; before the statistics were taken in f32 the whole
//! group came out zero.

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use dragonedit::model::nn::{GroupNorm, LayerNorm};

/// Deterministic values around `offset`, `scale` to `1.5 scale` at most from it.
fn wave<const D: usize>(shape: [usize; D], scale: f32, offset: f32, device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| offset + scale * (i as f32 * 0.37).sin() * (1.0 + 0.5 * (i as f32 * 0.0011).cos()))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let a: Vec<f32> = a
        .cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let b: Vec<f32> = b.into_data().try_to_vec::<f32>().expect("f32");
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

// Half an f16 ulp at each of the norm's f16 steps (the input's rounding, the centring, the
// division, the scale and the shift), at the sizes these values reach (inputs under 5 over a
// std near 2.2, outputs under 3.5): about 6.5e-3 at worst; measured 6.4e-3 (group norm) and
// 2.3e-3 (layer norm), on the CPU and lavapipe alike. Before the fix: 3.5 (group norm, both)
// and 2.6 (layer norm, lavapipe; the CPU backend already normalised in f32).
const F16_BOUND: f32 = 1e-2;

fn norms_in_f16(device: &Device) {
    let c = 320;
    let gamma = wave([c], 0.5, 1.0, device);
    let beta = wave([c], 0.2, 0.0, device);
    let x = wave([2, c, 64, 64], 3.0, 0.5, device);
    let reference = GroupNorm::new(gamma.clone(), beta.clone(), 32, 1e-5).forward(x.clone());
    let half = GroupNorm::new(
        gamma.clone().cast(DType::F16),
        beta.clone().cast(DType::F16),
        32,
        1e-5,
    )
    .forward(x.cast(DType::F16));
    assert_eq!(half.dtype(), DType::F16);
    let diff = max_diff(half, reference);
    assert!(diff < F16_BOUND, "group norm in f16: max difference {diff}");

    // Rows with values a few hundred from their mean, whose squares pass f16's range.
    let x = wave([1, 77, c], 300.0, 20.0, device);
    let reference = LayerNorm::new(gamma.clone(), beta.clone(), 1e-5).forward(x.clone());
    let half = LayerNorm::new(gamma.cast(DType::F16), beta.cast(DType::F16), 1e-5)
        .forward(x.cast(DType::F16));
    assert_eq!(half.dtype(), DType::F16);
    let diff = max_diff(half, reference);
    assert!(diff < F16_BOUND, "layer norm in f16: max difference {diff}");
}

#[test]
fn norms_in_f16_on_cpu() {
    norms_in_f16(&dragonedit::device::cpu());
}

#[test]
fn norms_in_f16_on_gpu() {
    if let Some(device) = common::wgpu_device() {
        norms_in_f16(&device);
    }
}
