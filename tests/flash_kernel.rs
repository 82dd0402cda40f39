//! The UNet with its attention as our own flash kernel, as the browser runs it
//! (`AttentionStrategy::Kernel`; natively the default is burn's fused op, which the other GPU
//! parity tests take), against diffusers' goldens. A test binary of its own because the
//! strategy is the process's.

mod common;

use burn::tensor::Tensor;
use common::{assert_close, load_tiny, npz, values, wgpu_device};
use dragonedit::model::attention::{
    AttentionStrategy, UnetAttention, set_attention_strategy, unet_attention,
};
use dragonedit::model::unet::NoHook;

/// As `diffusers_parity`'s GPU tolerance: wgpu reorders reductions and has its own kernels.
const GPU_TOL: f32 = 1e-3;

#[test]
fn unet_with_the_flash_kernel_matches_diffusers() {
    let Some(device) = wgpu_device() else {
        return;
    };
    set_attention_strategy(AttentionStrategy::Kernel);
    assert_eq!(
        unet_attention(&device, 8),
        UnetAttention::Kernel,
        "the strategy routes the UNet's attention to the kernel"
    );
    let sd = load_tiny(&device);
    let context = sd
        .encode_prompts(&["", "a photo of a cat"])
        .expect("encodes");
    let x: Tensor<4> = npz("diffusers", "unet.npz", "x").tensor(&device);
    for t in [981, 941] {
        let eps = sd.unet.forward(x.clone(), t as f32, &context, &mut NoHook);
        assert_close(
            &format!("eps t={t}"),
            &values(eps),
            &npz("diffusers", "unet.npz", &format!("eps_{t}")).values,
            GPU_TOL,
        );
    }
}
