//! Model configs, read from each component folder's config.json, so tiny test models, SD 1.5
//! and BK-SDM variants (same keys, fewer blocks) load through one path.

use serde::Deserialize;

use crate::error::{Error, Result};

fn model_error(file: &str, message: impl Into<String>) -> Error {
    Error::ModelFile {
        file: file.to_string(),
        message: message.into(),
    }
}

/// An int-or-list field of diffusers configs (`attention_head_dim`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn get(&self, i: usize) -> Option<usize> {
        match self {
            Self::One(v) => Some(*v),
            Self::Each(v) => v.get(i).copied(),
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_groups() -> usize {
    32
}
fn default_transformer_layers() -> usize {
    1
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_true() -> bool {
    true
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_one() -> f64 {
    1.0
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    pub cross_attention_dim: usize,
    /// In SD 1.x configs this is the number of heads (diffusers' naming quirk).
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: usize,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub upcast_attention: bool,
}

impl UnetConfig {
    pub fn parse(file: &str, json: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(json)
            .map_err(|e| model_error(file, format!("not a UNet config: {e}")))?;
        c.validate(file)?;
        Ok(c)
    }

    fn validate(&self, file: &str) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(model_error(
                file,
                "block_out_channels, down_block_types and up_block_types must have the same non-zero length",
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(model_error(file, format!("unsupported down block {t}")));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(model_error(file, format!("unsupported up block {t}")));
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(t) => return Err(model_error(file, format!("unsupported mid block {t}"))),
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(i);
            if heads == 0 || c % heads != 0 || c % self.norm_num_groups != 0 {
                return Err(model_error(
                    file,
                    format!(
                        "block {i}: {c} channels do not split into {heads} heads and {} groups",
                        self.norm_num_groups
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Attention heads of block `i` (SD 1.x: `attention_head_dim` is the head count).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
            .unwrap_or(8)
    }

    /// Channels of the time embedding (4x the first block's channels).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// diffusers' SDXL pipelines run a VAE with this flag in f32 even in an f16 pipeline (its
    /// default, and what SD 1.5's config says), since their decoder overflows f16. dragonedit
    /// decodes in the pipeline's dtype, as the official DragonDiffusion does, and again in f32
    /// only where the f16 result is not finite (the encoder is f32); the flag is read, not used.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

impl VaeConfig {
    pub fn parse(file: &str, json: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(json)
            .map_err(|e| model_error(file, format!("not an AutoencoderKL config: {e}")))?;
        if c.block_out_channels.is_empty()
            || c.block_out_channels
                .iter()
                .any(|ch| ch % c.norm_num_groups != 0)
        {
            return Err(model_error(
                file,
                "block_out_channels must be non-empty multiples of norm_num_groups",
            ));
        }
        Ok(c)
    }

    /// Pixels per latent cell (8 for SD 1.5).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The channels of the widest activation at the image's full resolution: in the encoder,
    /// its first block's; in the decoder, its second block's, which its last upsampling brings
    /// to full resolution before the last block narrows them. (128, 256) for SD 1.5.
    pub fn full_resolution_channels(&self) -> (usize, usize) {
        let c = &self.block_out_channels;
        (c[0], c[0].max(c.get(1).copied().unwrap_or(c[0])))
    }
}

/// `text_encoder/config.json` of a `CLIPTextModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_act() -> String {
    "quick_gelu".into()
}

impl ClipConfig {
    pub fn parse(file: &str, json: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(json)
            .map_err(|e| model_error(file, format!("not a CLIPTextModel config: {e}")))?;
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(model_error(file, "hidden_size must split into the heads"));
        }
        if c.vocab_size == 0 || c.max_position_embeddings == 0 {
            return Err(model_error(
                file,
                "vocab_size and max_position_embeddings must not be 0",
            ));
        }
        if c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" {
            return Err(model_error(
                file,
                format!("unsupported activation {}", c.hidden_act),
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::random::{SD15_UNET, SD15_VAE};

    #[test]
    fn the_vaes_widest_full_resolution_activations() {
        let c = VaeConfig::parse("vae/config.json", SD15_VAE).unwrap();
        assert_eq!(c.full_resolution_channels(), (128, 256));
        assert_eq!(c.downscale(), 8);
        let one_block = SD15_VAE
            .replace("[128, 256, 512, 512]", "[64]")
            .replace("\"DownEncoderBlock2D\", ", "")
            .replace("\"UpDecoderBlock2D\", ", "");
        let c = VaeConfig::parse("vae/config.json", &one_block).unwrap();
        assert_eq!(c.full_resolution_channels(), (64, 64));
    }

    #[test]
    fn reads_the_sd15_unet_config_with_defaults() {
        let c = UnetConfig::parse("unet/config.json", SD15_UNET).unwrap();
        assert_eq!(c.heads(2), 8);
        assert_eq!(c.time_embed_dim(), 1280);
        assert_eq!(c.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
        assert!(!c.use_linear_projection);
    }

    #[test]
    fn rejects_unknown_blocks_with_the_file_name() {
        let bad = SD15_UNET.replace("\"DownBlock2D\"]", "\"SimpleDownBlock\"]");
        let err = UnetConfig::parse("unet/config.json", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unet/config.json") && err.contains("SimpleDownBlock"),
            "{err}"
        );
    }
}
