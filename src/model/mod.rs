//! Stable Diffusion 1.5's networks (CLIP text encoder, UNet, VAE), their configs and the
//! tokenizer, plus the model-folder layout they are read from.

pub mod attention;
pub mod attention_choice;
pub mod clip;
pub mod config;
pub mod conv;
pub mod conv_choice;
pub mod fixed_product;
pub mod flash_attention;
pub mod folder;
pub mod nn;
pub mod normalize;
pub mod products;
pub mod pullback;
pub mod random;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod windows;

/// Smooth test values that differ per element and per seed: `amplitude · sin(i · seed) +
/// offset` along the flat index `i`, on the device the kernel tests compare on.
#[cfg(test)]
pub(crate) fn wave<const D: usize>(
    shape: [usize; D],
    seed: f32,
    [amplitude, offset]: [f32; 2],
    device: &burn::tensor::Device,
) -> burn::tensor::Tensor<D> {
    let n: usize = shape.iter().product();
    burn::tensor::Tensor::<1, burn::tensor::Int>::arange(0..n as i64, device)
        .float()
        .mul_scalar(seed)
        .sin()
        .mul_scalar(amplitude)
        .add_scalar(offset)
        .reshape(shape)
}

/// `sin(0.37 i + seed)` along the flat index `i`, made on the host: the layer tests' inputs,
/// values under 1 that differ per element and per seed.
#[cfg(test)]
pub(crate) fn layer_wave<const D: usize>(
    shape: [usize; D],
    seed: f32,
    device: &burn::tensor::Device,
) -> burn::tensor::Tensor<D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, shape), device)
}

/// The largest magnitude in `t`.
#[cfg(test)]
pub(crate) fn max_abs<const D: usize>(t: burn::tensor::Tensor<D>) -> f32 {
    t.abs().max().into_scalar::<f32>()
}
