//! A model folder whose weights are drawn at random with the shapes the model asks for: SD
//! 1.5-sized (or tiny) models for benchmarks, with nothing downloaded. The configs are SD 1.5's
//! own; the tokenizer knows only its two special tokens, so every prompt encodes as empty.

use std::collections::HashMap;

use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use super::folder::{ModelSource, layout};
use crate::error::{Error, Result};
use crate::weights::TensorRead;
use crate::weights::reader::HostTensor;

/// Random weights: norm scales 1, biases 0, everything else N(0, 1/fan_in) so activations keep
/// their scale through the network.
pub struct RandomWeights {
    label: String,
    rng: StdRng,
}

impl TensorRead for RandomWeights {
    fn label(&self) -> &str {
        &self.label
    }

    fn keys(&self) -> Vec<String> {
        Vec::new()
    }

    fn contains(&self, _: &str) -> bool {
        true
    }

    fn read(&mut self, key: &str) -> Result<HostTensor> {
        Err(Error::ModelFile {
            file: self.label.clone(),
            message: format!("random weights need the expected shape of `{key}`"),
        })
    }

    fn read_shaped(&mut self, key: &str, shape: &[usize]) -> Result<HostTensor> {
        let n: usize = shape.iter().product();
        let values = if key.ends_with("bias") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let std = (fan_in.max(1) as f32).sqrt().recip();
            (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(&mut self.rng);
                    z * std
                })
                .collect()
        };
        Ok(HostTensor {
            shape: shape.to_vec(),
            values,
        })
    }
}

/// Model sizes a random folder can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomModel {
    /// Stable Diffusion 1.5's configuration (860M-parameter UNet).
    Sd15,
    /// The tiny test model's configuration (tests/fixtures/tiny-sd).
    Tiny,
}

/// SD 1.5's `unet/config.json`.
pub const SD15_UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu",
 "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
 "center_input_sample": false, "cross_attention_dim": 768,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
 "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
 "out_channels": 4, "sample_size": 64,
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;

pub const SD15_VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu",
 "block_out_channels": [128, 256, 512, 512],
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
 "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;

const SD15_TEXT: &str = r#"{"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu",
 "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
 "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
 "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408}"#;

const TINY_UNET: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu",
 "attention_head_dim": 8, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 32,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
 "layers_per_block": 2, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
 "norm_eps": 1e-05, "norm_num_groups": 8, "out_channels": 4, "sample_size": 16,
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;

const TINY_VAE: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu",
 "block_out_channels": [16, 32, 32, 32],
 "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
 "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 8,
 "out_channels": 3, "sample_size": 128, "scaling_factor": 0.18215,
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;

const TINY_TEXT: &str = r#"{"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu",
 "hidden_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-05,
 "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 4,
 "num_hidden_layers": 2, "projection_dim": 32, "vocab_size": 49408}"#;

/// A model folder of configs and random weights.
pub struct RandomSource {
    files: HashMap<&'static str, String>,
    seed: u64,
}

impl RandomSource {
    pub fn new(model: RandomModel, seed: u64) -> Self {
        let (unet, vae, text) = match model {
            RandomModel::Sd15 => (SD15_UNET, SD15_VAE, SD15_TEXT),
            RandomModel::Tiny => (TINY_UNET, TINY_VAE, TINY_TEXT),
        };
        let files = HashMap::from([
            (layout::UNET_CONFIG, unet.to_string()),
            (layout::VAE_CONFIG, vae.to_string()),
            (layout::TEXT_CONFIG, text.to_string()),
            (
                layout::VOCAB,
                r#"{"<|startoftext|>": 49406, "<|endoftext|>": 49407}"#.to_string(),
            ),
            (layout::MERGES, "#version: 0.2\n".to_string()),
        ]);
        Self { files, seed }
    }

    /// The same model with the VAE's `block_out_channels` replaced: a VAE whose sizes differ
    /// from both SD 1.5's and the tiny model's, for what depends on them.
    pub fn with_vae_channels(mut self, channels: &[usize]) -> Result<Self> {
        let mut config: serde_json::Value =
            serde_json::from_str(&self.files[layout::VAE_CONFIG])
                .map_err(|e| Error::InvalidInput(format!("the VAE's config: {e}")))?;
        config["block_out_channels"] = channels.into();
        self.files.insert(layout::VAE_CONFIG, config.to_string());
        Ok(self)
    }
}

impl ModelSource for RandomSource {
    fn has(&self, path: &str) -> bool {
        self.files.contains_key(path)
            || [
                layout::UNET_WEIGHTS,
                layout::VAE_WEIGHTS,
                layout::TEXT_WEIGHTS,
            ]
            .iter()
            .any(|c| c.first() == Some(&path))
    }

    fn read_text(&mut self, path: &str) -> Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| Error::ModelFile {
                file: path.into(),
                message: "not part of a random model".into(),
            })
    }

    fn open_weights(&mut self, path: &str) -> Result<Box<dyn TensorRead>> {
        self.seed = self.seed.wrapping_add(1);
        Ok(Box::new(RandomWeights {
            label: format!("random {path}"),
            rng: StdRng::seed_from_u64(self.seed),
        }))
    }
}
