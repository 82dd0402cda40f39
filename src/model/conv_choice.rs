//! Which way a GPU convolves faster, timed on that GPU. In the browser burn runs without
//! autotune, and the two ways rank differently from one device to the next: on SwiftShader (a
//! CPU) burn's direct kernel won, the browser tests' edits taking 50-65 % longer as im2col +
//! matmul, while natively on an H200 the matmul ran the same convolution 5.8x faster. So the
//! page times one convolution of the model's first block both ways before it loads the model,
//! and loads every convolution the faster way.

use burn::tensor::{DType, Device, Distribution, Tensor};
use serde::Serialize;
use web_time::Instant;

use super::nn::{Conv2d, ConvSpec, ConvStrategy};
use crate::device::read_back;
use crate::error::Result;

/// The median time of one convolution each way, in milliseconds, and how far apart their
/// results were.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ConvTimings {
    /// burn's `conv2d`.
    pub direct_ms: f64,
    /// im2col + one matrix product.
    pub gemm_ms: f64,
    /// The largest difference between the two results, over the largest value of burn's.
    pub difference: f64,
    /// The most `difference` may be for im2col + matmul to be used at all: the rounding of
    /// sums of `9 channels` products in the dtype, with room (f32 1e-3; f16 2e-2, where the
    /// H200 measured 6.8e-3 at 320 channels). A kernel that computes something else on some
    /// device is off by about the values' own size.
    pub tolerance: f64,
}

impl ConvTimings {
    /// The faster way, if im2col + matmul agrees with burn's kernel; burn's on a tie, since it
    /// holds no im2col buffer.
    pub fn faster(&self) -> ConvStrategy {
        if self.gemm_ms < self.direct_ms && self.agree() {
            ConvStrategy::Gemm
        } else {
            ConvStrategy::Direct
        }
    }

    /// Whether both ways computed the same convolution.
    pub fn agree(&self) -> bool {
        self.difference <= self.tolerance
    }
}

/// Times a 3x3 convolution of `channels` to `channels` over a CFG batch of two `latent`-sized
/// maps in `dtype`, both ways, `runs` times each after a first call that compiles the kernels
/// and whose result is compared. Each run waits for its result to be read back, so a run is
/// the GPU's whole time for it.
pub async fn time_convolutions(
    device: &Device,
    dtype: DType,
    channels: usize,
    latent: (usize, usize),
    runs: usize,
) -> Result<ConvTimings> {
    let (h, w) = latent;
    let x = Tensor::<4>::random([2, channels, h, w], Distribution::Normal(0.0, 1.0), device)
        .cast(dtype);
    let std = (9.0 * channels.max(1) as f64).sqrt().recip();
    let weight = Tensor::<4>::random(
        [channels, channels, 3, 3],
        Distribution::Normal(0.0, std),
        device,
    )
    .cast(dtype);
    let spec = ConvSpec::k3(channels, channels);
    let direct = Conv2d::new(weight.clone(), None, spec, false);
    let gemm = Conv2d::new(weight, None, spec, true);
    let (direct_ms, expected) = time(&direct, &x, runs).await?;
    let (gemm_ms, got) = time(&gemm, &x, runs).await?;
    let scale = expected
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let difference = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max)
        / scale;
    Ok(ConvTimings {
        direct_ms,
        gemm_ms,
        difference: f64::from(difference),
        tolerance: if dtype == DType::F32 { 1e-3 } else { 2e-2 },
    })
}

/// The median milliseconds of `runs` calls, and the first call's result.
async fn time(conv: &Conv2d, x: &Tensor<4>, runs: usize) -> Result<(f64, Vec<f32>)> {
    let first = read_back(conv.forward(x.clone())).await?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        read_back(conv.forward(x.clone()).sum()).await?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_both_ways_and_compares_them() {
        let device = crate::device::cpu();
        let t = pollster::block_on(time_convolutions(&device, DType::F32, 8, (16, 16), 3))
            .expect("timings");
        assert!(t.direct_ms.is_finite() && t.direct_ms >= 0.0, "{t:?}");
        assert!(t.gemm_ms.is_finite() && t.gemm_ms >= 0.0, "{t:?}");
        // Both compute the same convolution: f32 rounding over 72 products.
        assert!(t.difference < 1e-5, "{t:?}");
        assert!(t.agree());
    }

    #[test]
    fn im2col_only_where_faster_and_in_agreement() {
        let timings = |gemm_ms, difference| ConvTimings {
            direct_ms: 2.0,
            gemm_ms,
            difference,
            tolerance: 1e-3,
        };
        assert_eq!(timings(1.0, 1e-6).faster(), ConvStrategy::Gemm);
        assert_eq!(timings(3.0, 1e-6).faster(), ConvStrategy::Direct);
        assert_eq!(timings(2.0, 1e-6).faster(), ConvStrategy::Direct);
        // Faster, but computing something else.
        assert_eq!(timings(1.0, 0.5).faster(), ConvStrategy::Direct);
        assert_eq!(timings(1.0, f64::INFINITY).faster(), ConvStrategy::Direct);
    }
}
