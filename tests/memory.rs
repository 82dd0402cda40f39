//! WebGPU buffer limits: self-attention at SD 1.5's 512 px scale (a 64x64 latent, 4096 tokens,
//! 8 heads) must run without any single allocation above 256 MiB. Unchunked, its score matrix
//! alone is one 512 MiB buffer per image. The head width is cut from 40 to 8 to keep the test
//! cheap on software Vulkan: the score matrices, which the chunking bounds, are the same size. Measured on the wgpu backend through burn's
//! memory-pool report (lavapipe in CI also caps bindings at 128 MiB, like WebGPU's default).

mod common;

use burn::tensor::{Distribution, Tensor};
use dragonedit::model::attention::AttentionPlan;

const MIB: u64 = 1 << 20;

#[test]
fn sd15_self_attention_at_512px_allocates_no_buffer_over_256_mib() {
    let Some(device) = common::wgpu_device() else {
        return;
    };
    let shape = [1, 8, 4096, 8];
    let q = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let out = AttentionPlan::default().attend(q, k, v, false);
    let sum = out.sum().into_scalar::<f32>();
    assert!(sum.is_finite());
    let report = device.memory_pool_report().expect("wgpu reports its pools");
    let largest = report.iter().map(|p| p.largest_alloc).max().unwrap_or(0);
    println!(
        "largest single allocation: {:.1} MiB",
        largest as f64 / MIB as f64
    );
    assert!(largest > 0, "the pool report saw no allocation");
    assert!(
        largest <= 256 * MIB,
        "largest allocation {} MiB exceeds 256 MiB",
        largest / MIB
    );
}
