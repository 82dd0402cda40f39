//! The layers SD 1.5 is built from, as plain structs holding device tensors.
//!
//! Weights are constants (no parameter gradients are ever needed): the guidance differentiates
//! with respect to the latent only, so these never need burn's `Module` machinery.

use burn::tensor::module::{conv2d, layer_norm, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor, activation};

use crate::error::Result;
use crate::weights::Loader;

/// A 2-D convolution with PyTorch's `[out, in, k, k]` weight layout.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
}

/// Shape and placement of a convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Padding as (before, after) on both spatial axes.
    pub padding: (usize, usize),
}

impl ConvSpec {
    /// A "same" 3x3 convolution.
    pub fn k3(c_in: usize, c_out: usize) -> Self {
        Self {
            c_in,
            c_out,
            kernel: 3,
            stride: 1,
            padding: (1, 1),
        }
    }

    /// A 1x1 convolution.
    pub fn k1(c_in: usize, c_out: usize) -> Self {
        Self {
            c_in,
            c_out,
            kernel: 1,
            stride: 1,
            padding: (0, 0),
        }
    }
}

impl Conv2d {
    pub fn load(w: &mut Loader, prefix: &str, spec: ConvSpec) -> Result<Self> {
        let k = spec.kernel;
        let weight = w.tensor(&format!("{prefix}.weight"), [spec.c_out, spec.c_in, k, k])?;
        let bias = Some(w.tensor(&format!("{prefix}.bias"), [spec.c_out])?);
        let options = ConvOptions::new_with_padding([spec.stride; 2], [spec.padding; 2], [1, 1], 1);
        Ok(Self {
            weight,
            bias,
            options,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(
            x,
            self.weight.clone(),
            self.bias.clone(),
            self.options.clone(),
        )
    }
}

/// A linear layer; the weight is kept `[in, out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn load(
        w: &mut Loader,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let weight = w.linear_weight(&format!("{prefix}.weight"), d_in, d_out)?;
        let bias = if with_bias {
            Some(w.tensor(&format!("{prefix}.bias"), [d_out])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, self.weight.clone(), self.bias.clone())
    }
}

/// GroupNorm over `[B, C, H, W]`, with PyTorch's biased variance.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(
        w: &mut Loader,
        prefix: &str,
        groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            gamma: w.tensor(&format!("{prefix}.weight"), [channels])?,
            beta: w.tensor(&format!("{prefix}.bias"), [channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, wd] = x.dims();
        let grouped = x.reshape([b, self.groups, (c / self.groups) * h * wd]);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed = (grouped - mean) / (var + self.eps).sqrt();
        let normed = normed.reshape([b, c, h, wd]);
        normed * self.gamma.clone().reshape([1, c, 1, 1]) + self.beta.clone().reshape([1, c, 1, 1])
    }
}

/// LayerNorm over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            gamma: w.tensor(&format!("{prefix}.weight"), [dim])?,
            beta: w.tensor(&format!("{prefix}.bias"), [dim])?,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.gamma.clone(), Some(self.beta.clone()), self.eps)
    }
}

/// `x` in `dtype`, with no cast op when it already is. The models compute in their weights'
/// dtype (f16 with `--f16`) and hand f32 back, so latents, schedules and energies stay f32.
pub fn to_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// SiLU, the activation of every SD 1.5 resnet.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activation::silu(x)
}

/// Nearest-neighbour upsampling to `size` (PyTorch's legacy "nearest": source index
/// `floor(dst · in / out)`), as diffusers' `Upsample2D` does before its conv.
pub fn upsample_nearest(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
    )
}

/// Nearest-neighbour 2x upsampling.
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    upsample_nearest(x, [2 * h, 2 * w])
}
