//! Stable Diffusion 1.5's networks (CLIP text encoder, UNet, VAE), their configs and the
//! tokenizer, plus the model-folder layout they are read from.

pub mod attention;
pub mod clip;
pub mod config;
pub mod conv_choice;
pub mod flash_attention;
pub mod folder;
pub mod nn;
pub mod normalize;
pub mod pullback;
pub mod random;
pub mod resnet;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod windows;
