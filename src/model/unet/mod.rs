//! UNet2DConditionModel for the SD 1.5 family, with a forward that can stop after any up block
//! (the guidance only needs `up_blocks.1/2`, ALGORITHM.md §3) and hooks on the decoder
//! self-attention K/V (the memory bank, §2.2).

pub mod attention_layer;
pub mod blocks;
pub mod hooks;
pub mod steps;
pub mod transformer;

use burn::tensor::{DType, Device, Tensor, TensorData};

use self::blocks::{DownBlock, MidBlock, UpBlock};
pub use self::hooks::{DecoderAttention, KvHook, NoHook};
use self::steps::{Env, walk};
pub use self::steps::{FeatureCheckpoints, Keep};
use super::attention::AttentionPlan;
use super::config::UnetConfig;
use super::conv::{Conv2d, ConvSpec};
use super::nn::{GroupNorm, Linear, silu, to_dtype};
use super::resnet::TimeProjections;
use crate::error::Result;
use crate::weights::Loader;

/// The conditional UNet.
#[derive(Debug, Clone)]
pub struct Unet {
    config: UnetConfig,
    dtype: DType,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// Every resnet's time projection as one layer (see [`ResnetBlock::take_time_projection`]).
    time_projections: Linear,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// How attention is chunked; see [`AttentionPlan`].
    pub attention: AttentionPlan,
}

impl Unet {
    /// Builds the UNet from `unet/diffusion_pytorch_model.safetensors` keys.
    pub fn load(config: &UnetConfig, w: &mut Loader) -> Result<Self> {
        let c0 = config.block_out_channels[0];
        let temb = config.time_embed_dim();
        let time_linear_1 = Linear::load(w, "time_embedding.linear_1", c0, temb, true)?;
        let time_linear_2 = Linear::load(w, "time_embedding.linear_2", temb, temb, true)?;
        let conv_in = Conv2d::load(w, "conv_in", ConvSpec::k3(config.in_channels, c0))?;
        let mut down = (0..config.block_out_channels.len())
            .map(|i| DownBlock::load(w, config, i))
            .collect::<Result<Vec<_>>>()?;
        let mut mid = match config.mid_block_type {
            Some(_) => Some(MidBlock::load(w, config)?),
            None => None,
        };
        let mut up = (0..config.block_out_channels.len())
            .map(|i| UpBlock::load(w, config, i))
            .collect::<Result<Vec<_>>>()?;
        let mut projections = Vec::new();
        let mut start = 0;
        let resnets = (down.iter_mut().flat_map(DownBlock::resnets_mut))
            .chain(mid.iter_mut().flat_map(MidBlock::resnets_mut))
            .chain(up.iter_mut().flat_map(UpBlock::resnets_mut));
        for resnet in resnets {
            if let Some(proj) = resnet.take_time_projection(start) {
                start += proj.out_features();
                projections.push(proj);
            }
        }
        let time_projections = Linear::concat(projections);
        let norm_out = GroupNorm::load(
            w,
            "conv_norm_out",
            config.norm_num_groups,
            c0,
            config.norm_eps,
        )?;
        let conv_out = Conv2d::load(w, "conv_out", ConvSpec::k3(c0, config.out_channels))?;
        Ok(Self {
            config: config.clone(),
            dtype: w.dtype(),
            time_linear_1,
            time_linear_2,
            time_projections,
            conv_in,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            attention: AttentionPlan::default(),
        })
    }

    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Sinusoidal timestep features exactly as diffusers' `get_timestep_embedding`, in f32 on
    /// the host (cos first when `flip_sin_to_cos`).
    fn timestep_features(&self, timestep: f32, batch: usize, device: &Device) -> Tensor<2> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let shift = self.config.freq_shift as f32;
        let ln_max_period = 10000f32.ln();
        let mut row = vec![0f32; dim];
        for i in 0..half {
            let exponent = -ln_max_period * i as f32 / (half as f32 - shift);
            let arg = timestep * exponent.exp();
            let (sin, cos) = (arg.sin(), arg.cos());
            if self.config.flip_sin_to_cos {
                row[i] = cos;
                row[half + i] = sin;
            } else {
                row[i] = sin;
                row[half + i] = cos;
            }
        }
        let values: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        Tensor::from_data(TensorData::new(values, [batch, dim]), (device, self.dtype))
    }

    /// Every resnet's projection of the time embedding of `timestep` (it does not depend on
    /// the latent), computed at once.
    fn time_embedding(&self, timestep: f32, batch: usize, device: &Device) -> TimeProjections {
        let t = self.timestep_features(timestep, batch, device);
        let embedding = self
            .time_linear_2
            .forward_rows(silu(self.time_linear_1.forward_rows(t)));
        let projected = self.time_projections.forward_rows(silu(embedding));
        let width = projected.dims()[1];
        TimeProjections(projected.reshape([batch, width, 1]))
    }

    /// Runs the UNet up to and including up block `last_up` and returns each up block's output
    /// (`outputs[i]` is `up_blocks.i`); with `head` and `last_up` = the final block, the noise
    /// prediction head runs too and its result is returned as the last element.
    fn run(
        &self,
        latent: Tensor<4>,
        timestep: f32,
        context: &Tensor<3>,
        hook: &mut dyn KvHook,
        last_up: usize,
        head: bool,
    ) -> Vec<Tensor<4>> {
        hook.begin_pass();
        let latent = to_dtype(latent, self.dtype);
        let context = &to_dtype(context.clone(), self.dtype);
        let times = self.time_embedding(timestep, latent.dims()[0], &latent.device());
        let env = Env {
            times: &times,
            context,
            plan: &self.attention,
        };
        let (x, mut outputs) = walk(&self.steps(last_up), latent, &env, hook, None);
        if head && last_up + 1 == self.up.len() {
            outputs.push(self.conv_out.forward(self.norm_out.forward_silu(x)));
        }
        outputs
    }

    /// Predicts the noise ε for `latent` `[B, 4, h, w]` at `timestep` with text `context`
    /// `[B, 77, C]`.
    pub fn forward(
        &self,
        latent: Tensor<4>,
        timestep: f32,
        context: &Tensor<3>,
        hook: &mut dyn KvHook,
    ) -> Tensor<4> {
        let mut outputs = self.run(latent, timestep, context, hook, self.up.len() - 1, true);
        let eps = outputs
            .pop()
            .expect("run() with the last up block returns the head output");
        to_dtype(eps, DType::F32)
    }

    /// The truncated forward of the guidance (ALGORITHM.md §3): stops after `up_blocks.2` and
    /// returns the outputs of up blocks 0..=2 in f32, so `up_blocks.3` and the head never run.
    pub fn up_block_features(
        &self,
        latent: Tensor<4>,
        timestep: f32,
        context: &Tensor<3>,
        last_up: usize,
    ) -> Vec<Tensor<4>> {
        self.up_block_outputs(latent, timestep, context, last_up)
            .into_iter()
            .map(|x| to_dtype(x, DType::F32))
            .collect()
    }

    /// [`up_block_features`](Self::up_block_features) in the model's own dtype: for features
    /// that are kept (an f16 model's take half the memory in f16).
    pub fn up_block_outputs(
        &self,
        latent: Tensor<4>,
        timestep: f32,
        context: &Tensor<3>,
        last_up: usize,
    ) -> Vec<Tensor<4>> {
        let last = last_up.min(self.up.len() - 1);
        let mut outputs = self.run(latent, timestep, context, &mut NoHook, last, false);
        outputs.truncate(last + 1);
        outputs
    }
}
