//! AutoencoderKL: the encoder (posterior mean x scaling factor) and the decoder.

use burn::tensor::{DType, Tensor};

use super::attention::AttentionPlan;
use super::config::VaeConfig;
use super::conv::{Conv2d, ConvSpec};
use super::nn::{GroupNorm, Linear, to_dtype, upsample_nearest_2x};
use super::resnet::{ResnetBlock, ResnetSpec};
use crate::error::Result;
use crate::weights::Loader;

/// diffusers' VAE norms use eps 1e-6 throughout.
const VAE_EPS: f64 = 1e-6;

/// Older checkpoints (including the published SD 1.5 VAE) name the mid-block attention
/// projections `query`/`key`/`value`/`proj_attn`; diffusers renames them on load.
pub fn legacy_vae_key(key: &str) -> Option<String> {
    let renames = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    renames
        .iter()
        .find(|(new, _)| key.contains(new))
        .map(|(new, old)| key.replace(new, old))
}

/// Single-head spatial self-attention of the VAE mid block, with a residual.
#[derive(Debug, Clone)]
struct SpatialAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(w: &mut Loader, p: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::load(w, &format!("{p}.group_norm"), groups, c, VAE_EPS)?,
            to_q: Linear::load(w, &format!("{p}.to_q"), c, c, true)?,
            to_k: Linear::load(w, &format!("{p}.to_k"), c, c, true)?,
            to_v: Linear::load(w, &format!("{p}.to_v"), c, c, true)?,
            to_out: Linear::load(w, &format!("{p}.to_out.0"), c, c, true)?,
        })
    }

    fn forward(&self, x: Tensor<4>, plan: &AttentionPlan) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let heads = |t: Tensor<3>| t.reshape([b, 1, h * w, c]);
        let out = plan.attend(
            heads(self.to_q.forward(tokens.clone())),
            heads(self.to_k.forward(tokens.clone())),
            heads(self.to_v.forward(tokens)),
            false,
        );
        let out = self.to_out.forward(out.reshape([b, h * w, c]));
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

#[derive(Debug, Clone)]
struct VaeMid {
    resnet0: ResnetBlock,
    attention: SpatialAttention,
    resnet1: ResnetBlock,
}

fn vae_resnet(c_in: usize, c_out: usize, groups: usize) -> ResnetSpec {
    ResnetSpec {
        c_in,
        c_out,
        temb: None,
        groups,
        eps: VAE_EPS,
        output_scale: 1.0,
    }
}

impl VaeMid {
    fn load(w: &mut Loader, p: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            resnet0: ResnetBlock::load(w, &format!("{p}.resnets.0"), vae_resnet(c, c, groups))?,
            attention: SpatialAttention::load(w, &format!("{p}.attentions.0"), c, groups)?,
            resnet1: ResnetBlock::load(w, &format!("{p}.resnets.1"), vae_resnet(c, c, groups))?,
        })
    }

    fn forward(&self, x: Tensor<4>, plan: &AttentionPlan) -> Tensor<4> {
        let x = self.resnet0.forward(x, None);
        let x = self.attention.forward(x, plan);
        self.resnet1.forward(x, None)
    }
}

/// A stage of resnets followed by an optional resampling conv.
#[derive(Debug, Clone)]
struct Stage {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

/// The VAE: image `[B, 3, H, W]` in [-1, 1] ⇄ latent `[B, 4, H/8, W/8]`.
#[derive(Debug, Clone)]
pub struct Vae {
    config: VaeConfig,
    dtype: DType,
    enc_conv_in: Conv2d,
    enc_stages: Vec<Stage>,
    enc_mid: VaeMid,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    dec_conv_in: Conv2d,
    dec_mid: VaeMid,
    dec_stages: Vec<Stage>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
    /// How attention is chunked; see [`AttentionPlan`].
    pub attention: AttentionPlan,
}

impl Vae {
    /// Builds the VAE from `vae/diffusion_pytorch_model.safetensors` keys (diffusers names, or
    /// the legacy attention names through [`legacy_vae_key`]).
    pub fn load(config: &VaeConfig, w: &mut Loader) -> Result<Self> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let g = config.norm_num_groups;
        let lat = config.latent_channels;
        let top = ch[n - 1];

        let enc_conv_in = Conv2d::load(
            w,
            "encoder.conv_in",
            ConvSpec::k3(config.in_channels, ch[0]),
        )?;
        let mut enc_stages = Vec::new();
        for i in 0..n {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            let p = format!("encoder.down_blocks.{i}");
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let r_in = if j == 0 { c_in } else { ch[i] };
                    ResnetBlock::load(w, &format!("{p}.resnets.{j}"), vae_resnet(r_in, ch[i], g))
                })
                .collect::<Result<Vec<_>>>()?;
            // diffusers pads (0, 1, 0, 1) and convolves with stride 2 and no padding.
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.downsamplers.0.conv"),
                    ConvSpec {
                        stride: 2,
                        padding: (0, 1),
                        ..ConvSpec::k3(ch[i], ch[i])
                    },
                )?)
            } else {
                None
            };
            enc_stages.push(Stage { resnets, resample });
        }
        let enc_mid = VaeMid::load(w, "encoder.mid_block", top, g)?;
        let enc_norm_out = GroupNorm::load(w, "encoder.conv_norm_out", g, top, VAE_EPS)?;
        let enc_conv_out = Conv2d::load(w, "encoder.conv_out", ConvSpec::k3(top, 2 * lat))?;
        let quant_conv = Conv2d::load(w, "quant_conv", ConvSpec::k1(2 * lat, 2 * lat))?;

        let post_quant_conv = Conv2d::load(w, "post_quant_conv", ConvSpec::k1(lat, lat))?;
        let dec_conv_in = Conv2d::load(w, "decoder.conv_in", ConvSpec::k3(lat, top))?;
        let dec_mid = VaeMid::load(w, "decoder.mid_block", top, g)?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut dec_stages = Vec::new();
        for i in 0..n {
            let prev = if i == 0 { rev[0] } else { rev[i - 1] };
            let p = format!("decoder.up_blocks.{i}");
            let resnets = (0..=config.layers_per_block)
                .map(|j| {
                    let r_in = if j == 0 { prev } else { rev[i] };
                    ResnetBlock::load(w, &format!("{p}.resnets.{j}"), vae_resnet(r_in, rev[i], g))
                })
                .collect::<Result<Vec<_>>>()?;
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.upsamplers.0.conv"),
                    ConvSpec::k3(rev[i], rev[i]),
                )?)
            } else {
                None
            };
            dec_stages.push(Stage { resnets, resample });
        }
        let dec_norm_out = GroupNorm::load(w, "decoder.conv_norm_out", g, ch[0], VAE_EPS)?;
        let dec_conv_out = Conv2d::load(
            w,
            "decoder.conv_out",
            ConvSpec::k3(ch[0], config.out_channels),
        )?;
        Ok(Self {
            dtype: w.dtype(),
            config: config.clone(),
            enc_conv_in,
            enc_stages,
            enc_mid,
            enc_norm_out,
            enc_conv_out,
            quant_conv,
            post_quant_conv,
            dec_conv_in,
            dec_mid,
            dec_stages,
            dec_norm_out,
            dec_conv_out,
            attention: AttentionPlan::default(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights, which [`decode`](Self::decode) computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Image in [-1, 1] → latent: the posterior mean times the scaling factor (0.18215),
    /// computed in `dtype` (f32 on f16 weights: the layers cast them as they go).
    pub fn encode_in(&self, image: Tensor<4>, dtype: DType) -> Tensor<4> {
        let mut x = self.enc_conv_in.forward(to_dtype(image, dtype));
        for stage in &self.enc_stages {
            for r in &stage.resnets {
                x = r.forward(x, None);
            }
            if let Some(down) = &stage.resample {
                x = down.forward(x);
            }
        }
        let x = self.enc_mid.forward(x, &self.attention);
        let x = self.enc_conv_out.forward(self.enc_norm_out.forward_silu(x));
        let moments = self.quant_conv.forward(x);
        let lat = self.config.latent_channels;
        to_dtype(moments.narrow(1, 0, lat), DType::F32) * self.config.scaling_factor
    }

    /// Latent → image in [0, 1] (`clamp(x / 2 + 0.5, 0, 1)`).
    pub fn decode(&self, latent: Tensor<4>) -> Tensor<4> {
        self.decode_in(latent, self.dtype)
    }

    /// [`decode`](Self::decode) computing in `dtype`.
    pub fn decode_in(&self, latent: Tensor<4>, dtype: DType) -> Tensor<4> {
        self.decode_unclamped_in(latent, dtype).clamp(0.0, 1.0)
    }

    /// `x / 2 + 0.5` of the decoder's output, before the clamp to [0, 1]: a clamp on the GPU
    /// may turn NaN into 0 or 1 (WGSL leaves `min`/`max` of NaN to the implementation), so an
    /// overflow is only seen here.
    pub fn decode_unclamped_in(&self, latent: Tensor<4>, dtype: DType) -> Tensor<4> {
        let z = to_dtype(latent / self.config.scaling_factor, dtype);
        let x = self.dec_conv_in.forward(self.post_quant_conv.forward(z));
        let mut x = self.dec_mid.forward(x, &self.attention);
        for stage in &self.dec_stages {
            for r in &stage.resnets {
                x = r.forward(x, None);
            }
            if let Some(up) = &stage.resample {
                x = up.forward(upsample_nearest_2x(x));
            }
        }
        let x = self.dec_conv_out.forward(self.dec_norm_out.forward_silu(x));
        to_dtype(x, DType::F32) / 2.0 + 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_map_to_the_old_spelling() {
        assert_eq!(
            legacy_vae_key("encoder.mid_block.attentions.0.to_out.0.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.proj_attn.weight")
        );
        assert_eq!(
            legacy_vae_key("decoder.mid_block.attentions.0.to_q.bias").as_deref(),
            Some("decoder.mid_block.attentions.0.query.bias")
        );
        assert_eq!(legacy_vae_key("decoder.conv_in.weight"), None);
    }
}
