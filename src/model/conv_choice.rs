//! Which way a GPU convolves faster, timed on that GPU. In the browser burn runs without
//! autotune, and the two ways rank differently from one device to the next: on SwiftShader (a
//! CPU) burn's direct kernel won, the browser tests' edits taking 50-65 % longer as im2col +
//! matmul, while natively on an H200 the matmul ran the same convolution 5.8x faster. So the
//! page times one convolution of the model's first block both ways before it loads the model,
//! and loads every convolution the faster way.

use burn::tensor::{DType, Device, Distribution, Tensor};
use serde::Serialize;
use web_time::Instant;

use super::conv::{Conv2d, ConvSpec, ConvStrategy};
use crate::device::read_back;
use crate::error::Result;

/// The median time of one convolution each way, in milliseconds, and how far each result is
/// from the same convolution computed in f32.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ConvTimings {
    /// burn's `conv2d`.
    pub direct_ms: f64,
    /// im2col + one matrix product.
    pub gemm_ms: f64,
    /// The largest difference of burn's result from the f32 result, over the largest f32
    /// value: 0 in f32, where burn's kernel is the reference. In f16 it is burn's own
    /// rounding: on lavapipe its kernel summed in f16 (1.8e-2 at 320 channels, against 4.5e-4
    /// for the matmul, which sums in f32).
    pub direct_error: f64,
    /// The same for im2col + matmul.
    pub gemm_error: f64,
    /// The error im2col + matmul may have anyway: the rounding of sums of `9 channels`
    /// products, with room (f32 1e-3, f16 2e-2). A kernel that computes something else on
    /// some device is off by about the values' own size.
    pub tolerance: f64,
}

impl ConvTimings {
    /// The faster way, if im2col + matmul computes the convolution; burn's on a tie, since it
    /// holds no im2col buffer.
    pub fn faster(&self) -> ConvStrategy {
        if self.gemm_ms < self.direct_ms && self.gemm_is_accurate() {
            ConvStrategy::Gemm
        } else {
            ConvStrategy::Direct
        }
    }

    /// Whether im2col + matmul is within the tolerance of the f32 result, or no further from
    /// it than burn's kernel.
    pub fn gemm_is_accurate(&self) -> bool {
        self.gemm_error <= self.tolerance.max(self.direct_error)
    }
}

/// Times a 3x3 convolution of `channels` to `channels` over a CFG batch of two `latent`-sized
/// maps in `dtype`, both ways, `runs` times each after a first call that compiles the kernels
/// and whose result is compared with burn's kernel in f32 on the same values. Each run waits
/// for its result to be read back, so a run is the GPU's whole time for it.
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
    let gemm = Conv2d::new(weight.clone(), None, spec, true);
    let (direct_ms, direct_out) = time(&direct, &x, runs).await?;
    let (gemm_ms, gemm_out) = time(&gemm, &x, runs).await?;
    let in_f32;
    let reference = if dtype == DType::F32 {
        &direct_out
    } else {
        let exact = Conv2d::new(weight.cast(DType::F32), None, spec, false);
        in_f32 = read_back(exact.forward(x.cast(DType::F32))).await?;
        &in_f32
    };
    Ok(ConvTimings {
        direct_ms,
        gemm_ms,
        direct_error: relative_error(&direct_out, reference),
        gemm_error: relative_error(&gemm_out, reference),
        tolerance: if dtype == DType::F32 { 1e-3 } else { 2e-2 },
    })
}

/// `max |got - want| / max |want|`; infinite where `got` is not finite or the lengths differ.
pub(super) fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max);
    f64::from(diff / scale)
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
    fn times_both_ways_and_measures_their_error() {
        let device = crate::device::cpu();
        for dtype in [DType::F32, DType::F16] {
            let t = pollster::block_on(time_convolutions(&device, dtype, 8, (16, 16), 3))
                .expect("timings");
            assert!(t.direct_ms.is_finite() && t.direct_ms >= 0.0, "{t:?}");
            assert!(t.gemm_ms.is_finite() && t.gemm_ms >= 0.0, "{t:?}");
            // Sums of 72 products: f32 rounds them to about 1e-7, f16 to about 1e-3.
            let bound = if dtype == DType::F32 { 1e-5 } else { 5e-3 };
            assert!(t.gemm_error < bound && t.direct_error < bound, "{t:?}");
            assert!(t.gemm_is_accurate(), "{t:?}");
        }
    }

    #[test]
    fn relative_error_of_the_largest_difference() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 4.0]), 0.5);
        assert_eq!(relative_error(&[f32::NAN, 4.0], &[1.0, 4.0]), f64::INFINITY);
        assert_eq!(relative_error(&[1.0], &[1.0, 4.0]), f64::INFINITY);
    }

    #[test]
    fn im2col_only_where_faster_and_accurate() {
        let timings = |gemm_ms, gemm_error, direct_error| ConvTimings {
            direct_ms: 2.0,
            gemm_ms,
            direct_error,
            gemm_error,
            tolerance: 1e-3,
        };
        assert_eq!(timings(1.0, 1e-6, 0.0).faster(), ConvStrategy::Gemm);
        assert_eq!(timings(3.0, 1e-6, 0.0).faster(), ConvStrategy::Direct);
        assert_eq!(timings(2.0, 1e-6, 0.0).faster(), ConvStrategy::Direct);
        // Faster, but computing something else.
        assert_eq!(timings(1.0, 0.5, 0.0).faster(), ConvStrategy::Direct);
        assert_eq!(
            timings(1.0, f64::INFINITY, 0.0).faster(),
            ConvStrategy::Direct
        );
        // Past the tolerance, but no further from f32 than burn's own kernel.
        assert_eq!(timings(1.0, 2e-3, 3e-3).faster(), ConvStrategy::Gemm);
    }
}
