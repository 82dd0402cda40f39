//! The UNet's down, mid and up blocks (CrossAttnDownBlock2D / DownBlock2D,
//! UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D).

use super::steps::Step;
use super::transformer::{Transformer2D, TransformerSpec};
use crate::error::Result;
use crate::model::config::UnetConfig;
use crate::model::conv::{Conv2d, ConvSpec};
use crate::model::resnet::{ResnetBlock, ResnetSpec};
use crate::weights::Loader;

fn resnet_spec(c: &UnetConfig, c_in: usize, c_out: usize, output_scale: f64) -> ResnetSpec {
    ResnetSpec {
        c_in,
        c_out,
        temb: Some(c.time_embed_dim()),
        groups: c.norm_num_groups,
        eps: c.norm_eps,
        output_scale,
    }
}

fn transformer_spec(c: &UnetConfig, channels: usize, heads: usize) -> TransformerSpec {
    TransformerSpec {
        channels,
        context_dim: c.cross_attention_dim,
        heads,
        groups: c.norm_num_groups,
        layers: c.transformer_layers_per_block,
        linear_projection: c.use_linear_projection,
    }
}

/// `down_blocks.i`: resnets (with transformers in the cross-attention variant), then a
/// stride-2 conv except in the last block.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    pub fn load(w: &mut Loader, c: &UnetConfig, i: usize) -> Result<Self> {
        let n = c.block_out_channels.len();
        let c_out = c.block_out_channels[i];
        let c_in = if i == 0 {
            c.block_out_channels[0]
        } else {
            c.block_out_channels[i - 1]
        };
        let p = format!("down_blocks.{i}");
        let cross = c.down_block_types[i] == "CrossAttnDownBlock2D";
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..c.layers_per_block {
            let r_in = if j == 0 { c_in } else { c_out };
            resnets.push(ResnetBlock::load(
                w,
                &format!("{p}.resnets.{j}"),
                resnet_spec(c, r_in, c_out, 1.0),
            )?);
            if cross {
                attentions.push(Transformer2D::load(
                    w,
                    &format!("{p}.attentions.{j}"),
                    transformer_spec(c, c_out, c.heads(i)),
                )?);
            }
        }
        let downsampler = if i + 1 < n {
            Some(Conv2d::load(
                w,
                &format!("{p}.downsamplers.0.conv"),
                ConvSpec {
                    stride: 2,
                    ..ConvSpec::k3(c_out, c_out)
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock> {
        self.resnets.iter_mut()
    }

    /// Resnet (and transformer) per layer, each output kept as a skip state; then the
    /// downsampler, its output kept too.
    pub fn steps<'a>(&'a self, steps: &mut Vec<Step<'a>>) {
        for (j, resnet) in self.resnets.iter().enumerate() {
            steps.push(Step::Resnet(resnet));
            if let Some(attn) = self.attentions.get(j) {
                steps.push(Step::Transformer(attn, None));
            }
            steps.push(Step::Save);
        }
        if let Some(down) = &self.downsampler {
            steps.push(Step::Conv(down));
            steps.push(Step::Save);
        }
    }
}

/// `mid_block`: resnet, transformer, resnet at the lowest resolution.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet0: ResnetBlock,
    attention: Transformer2D,
    resnet1: ResnetBlock,
}

impl MidBlock {
    pub fn load(w: &mut Loader, c: &UnetConfig) -> Result<Self> {
        let n = c.block_out_channels.len();
        let ch = c.block_out_channels[n - 1];
        let scale = c.mid_block_scale_factor;
        Ok(Self {
            resnet0: ResnetBlock::load(w, "mid_block.resnets.0", resnet_spec(c, ch, ch, scale))?,
            attention: Transformer2D::load(
                w,
                "mid_block.attentions.0",
                transformer_spec(c, ch, c.heads(n - 1)),
            )?,
            resnet1: ResnetBlock::load(w, "mid_block.resnets.1", resnet_spec(c, ch, ch, scale))?,
        })
    }

    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock> {
        [&mut self.resnet0, &mut self.resnet1].into_iter()
    }

    pub fn steps<'a>(&'a self, steps: &mut Vec<Step<'a>>) {
        steps.push(Step::Resnet(&self.resnet0));
        steps.push(Step::Transformer(&self.attention, None));
        steps.push(Step::Resnet(&self.resnet1));
    }
}

/// `up_blocks.i`: resnets over the concatenated skip states (with transformers in the
/// cross-attention variant), then a 2x nearest upsample and conv except in the last block.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    pub fn load(w: &mut Loader, c: &UnetConfig, i: usize) -> Result<Self> {
        let n = c.block_out_channels.len();
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let prev_out = if i == 0 { rev[0] } else { rev[i - 1] };
        let c_out = rev[i];
        let c_in = rev[(i + 1).min(n - 1)];
        let layers = c.layers_per_block + 1;
        let p = format!("up_blocks.{i}");
        let cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j + 1 == layers { c_in } else { c_out };
            let r_in = if j == 0 { prev_out } else { c_out };
            resnets.push(ResnetBlock::load(
                w,
                &format!("{p}.resnets.{j}"),
                resnet_spec(c, r_in + skip, c_out, 1.0),
            )?);
            if cross {
                attentions.push(Transformer2D::load(
                    w,
                    &format!("{p}.attentions.{j}"),
                    transformer_spec(c, c_out, c.heads(n - 1 - i)),
                )?);
            }
        }
        let upsampler = if i + 1 < n {
            Some(Conv2d::load(
                w,
                &format!("{p}.upsamplers.0.conv"),
                ConvSpec::k3(c_out, c_out),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn resnets_mut(&mut self) -> impl Iterator<Item = &mut ResnetBlock> {
        self.resnets.iter_mut()
    }

    /// Per layer a resnet over the input joined with the last skip state (and a transformer,
    /// named `(index, layer)` for the KV hook); then the upsampler; then the block output.
    pub fn steps<'a>(&'a self, index: usize, steps: &mut Vec<Step<'a>>) {
        for (j, resnet) in self.resnets.iter().enumerate() {
            steps.push(Step::SkipResnet(resnet));
            if let Some(attn) = self.attentions.get(j) {
                steps.push(Step::Transformer(attn, Some((index, j))));
            }
        }
        if let Some(up) = &self.upsampler {
            steps.push(Step::Upsample(up));
        }
        steps.push(Step::Output);
    }
}
