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

/// The median time of one convolution each way, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ConvTimings {
    /// burn's `conv2d`.
    pub direct_ms: f64,
    /// im2col + one matrix product.
    pub gemm_ms: f64,
}

impl ConvTimings {
    /// The faster way; burn's own kernel on a tie, since it holds no im2col buffer.
    pub fn faster(&self) -> ConvStrategy {
        if self.gemm_ms < self.direct_ms {
            ConvStrategy::Gemm
        } else {
            ConvStrategy::Direct
        }
    }
}

/// Times a 3x3 convolution of `channels` to `channels` over a CFG batch of two `latent`-sized
/// maps in `dtype`, both ways, `runs` times each after a first call that compiles the kernels.
/// Each run waits for its result to be read back, so a run is the GPU's whole time for it.
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
    Ok(ConvTimings {
        direct_ms: median_ms(&direct, &x, runs).await?,
        gemm_ms: median_ms(&gemm, &x, runs).await?,
    })
}

async fn median_ms(conv: &Conv2d, x: &Tensor<4>, runs: usize) -> Result<f64> {
    read_back(conv.forward(x.clone()).sum()).await?;
    let mut times = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        read_back(conv.forward(x.clone()).sum()).await?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_both_ways_and_picks_the_faster() {
        let device = crate::device::cpu();
        let t = pollster::block_on(time_convolutions(&device, DType::F32, 8, (16, 16), 3))
            .expect("timings");
        assert!(t.direct_ms.is_finite() && t.direct_ms >= 0.0, "{t:?}");
        assert!(t.gemm_ms.is_finite() && t.gemm_ms >= 0.0, "{t:?}");
        let slower_gemm = ConvTimings {
            direct_ms: 1.0,
            gemm_ms: 2.0,
        };
        assert_eq!(slower_gemm.faster(), ConvStrategy::Direct);
        let faster_gemm = ConvTimings {
            direct_ms: 2.0,
            gemm_ms: 1.0,
        };
        assert_eq!(faster_gemm.faster(), ConvStrategy::Gemm);
    }
}
