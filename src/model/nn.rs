//! The layers SD 1.5 is built from, as plain structs holding device tensors.
//!
//! Weights are constants (no parameter gradients are ever needed): the guidance differentiates
//! with respect to the latent only, so these never need burn's `Module` machinery.

use burn::tensor::{DType, Tensor, activation};

use super::normalize::{Rows, normalize, normalize_pull_back};
use super::products::ProductSplit;
use crate::error::Result;
use crate::weights::Loader;

/// A linear layer on `[B, N, in]` tokens. The weight is kept `[1, in, out]` and the bias
/// `[1, 1, out]`, shaped once at load: burn's `linear` reshapes both on every call, and a
/// reshape in burn-fusion's stream ends a fused segment, so the bias add ran as a kernel of its
/// own instead of in the matrix product's (docs/BENCHMARKS.md, "Kernel launches per pass").
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor<3>,
    bias: Option<Tensor<3>>,
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
        Ok(Self::new(weight, bias))
    }

    /// A layer of `weight` `[in, out]` and `bias` `[out]`.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: weight.unsqueeze(),
            bias: bias.map(|b| b.unsqueeze()),
        }
    }

    /// The layers side by side, as one: their outputs concatenated (all with a bias or none).
    pub fn concat(layers: Vec<Linear>) -> Self {
        cat_layers(layers, 2)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[2]
    }

    /// Computes in `x`'s dtype, as [`Conv2d::forward`](super::conv::Conv2d::forward) does.
    /// `x` may be of any batch that broadcasts against the weight's ([`StackedLinear`]).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let dtype = x.dtype();
        let y = ProductSplit::current().matmul(x, to_dtype(self.weight.clone(), dtype));
        match &self.bias {
            Some(bias) => y + to_dtype(bias.clone(), dtype),
            None => y,
        }
    }

    /// [`forward`](Self::forward) for `[B, in]` rows.
    pub fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        let [b, _] = x.dims();
        self.forward(x.unsqueeze_dim(1))
            .reshape([b, self.out_features()])
    }

    /// `gᵀ ∂linear/∂x`: `g Wᵀ`, needing nothing of `x`.
    pub fn pull_back(&self, g: Tensor<3>) -> Tensor<3> {
        ProductSplit::current().matmul(g, self.weight.clone().swap_dims(1, 2))
    }
}

/// Linear layers of one input, computed by one batched product: weights `[n, in, out]`, biases
/// `[n, 1, out]`. Each output is a contiguous slice of the product's; side by side along the
/// features instead, each would be a strided view that burn's attention copies before use.
/// Held as one [`Linear`] whose weight and bias have one entry per layer along the first axis.
#[derive(Debug, Clone)]
pub struct StackedLinear(Linear);

impl StackedLinear {
    /// The layers, all of the same widths, with a bias each or none.
    pub fn stack(layers: Vec<Linear>) -> Self {
        Self(cat_layers(layers, 0))
    }

    /// Every layer's output for `[B, N, in]` tokens, each `[B, N, out]`.
    pub fn forward(&self, x: Tensor<3>) -> Vec<Tensor<3>> {
        let [b, n, d_in] = x.dims();
        let [layers, _, d_out] = self.0.weight.dims();
        let y = self.0.forward(x.reshape([1, b * n, d_in]));
        (0..layers)
            .map(|i| y.clone().narrow(0, i, 1).reshape([b, n, d_out]))
            .collect()
    }

    /// `Σᵢ gᵢᵀ ∂layerᵢ/∂x` for `g` `[layers, m, out]`, one cotangent per layer: `[1, m, in]`.
    pub fn pull_back(&self, g: Tensor<3>) -> Tensor<3> {
        self.0.pull_back(g).sum_dim(0)
    }
}

/// The layers' weights and biases concatenated along `dim` (2: outputs side by side; 0:
/// stacked); a bias only where every layer has one.
fn cat_layers(layers: Vec<Linear>, dim: usize) -> Linear {
    // The model's code passes fixed lists of two or three layers.
    let device = layers.first().expect("layers to join").weight.device();
    // Made once with the model and kept as long: as weights are (`device::persistent`).
    crate::device::persistent(&device, layers, |layers| {
        let (weights, biases): (Vec<_>, Vec<_>) =
            layers.into_iter().map(|l| (l.weight, l.bias)).unzip();
        Linear {
            weight: Tensor::cat(weights, dim),
            bias: biases
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .map(|b| Tensor::cat(b, dim)),
        }
    })
}

/// GroupNorm over `[B, C, H, W]`, with PyTorch's biased variance (see [`normalize`]).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    scale: Tensor<1>,
    shift: Tensor<1>,
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
        Ok(Self::new(
            w.tensor(&format!("{prefix}.weight"), [channels])?,
            w.tensor(&format!("{prefix}.bias"), [channels])?,
            groups,
            eps,
        ))
    }

    /// A norm of `channels` channels in `groups` groups with the given scale and shift.
    pub fn new(gamma: Tensor<1>, beta: Tensor<1>, groups: usize, eps: f64) -> Self {
        Self {
            scale: gamma,
            shift: beta,
            groups,
            eps,
        }
    }

    /// The statistics and the arithmetic are in f32 whatever `x`'s dtype ([`normalize`]):
    /// in f16 a 64x64 group of 10 channels (40960 values) passes f16's largest value once
    /// their mean square passes 1.6; the variance is then infinite and the whole group comes
    /// out zero. PyTorch's f16 norms accumulate in f32 too.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_then(x, false)
    }

    /// `SiLU(forward(x))`, the SiLU in the norm's kernel.
    pub fn forward_silu(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_then(x, true)
    }

    fn forward_then(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let [b, c, h, wd] = x.dims();
        normalize(
            x.reshape([b, c, h * wd]),
            self.scale.clone(),
            self.shift.clone(),
            Rows::Groups(self.groups),
            self.eps,
            silu,
        )
        .reshape([b, c, h, wd])
    }

    /// `plus + gᵀ ∂f/∂x` at `x` for `f` the norm, followed by SiLU where `then_silu`, in
    /// closed form ([`normalize_pull_back`]); `plus`, where given, is the cotangent of the
    /// residual path beside the norm, summed in the same kernel. `g` may have more rows than
    /// `x` (one per energy). One kernel on the GPU, where the same formula composed of burn's
    /// ops launched 7 and the sum another, and autodiff of the norm 33 (docs/BENCHMARKS.md).
    pub fn pull_back(
        &self,
        x: &Tensor<4>,
        g: Tensor<4>,
        then_silu: bool,
        plus: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let [b, c, h, wd] = x.dims();
        let rows = g.dims()[0];
        normalize_pull_back(
            x.clone().reshape([b, c, h * wd]),
            g.reshape([rows, c, h * wd]),
            self.scale.clone(),
            self.shift.clone(),
            Rows::Groups(self.groups),
            self.eps,
            then_silu,
            plus.map(|p| p.reshape([rows, c, h * wd])),
        )
        .reshape([rows, c, h, wd])
    }
}

/// LayerNorm over the last axis of `[B, N, C]` tokens, with the scale and shift kept in f32
/// (see [`forward`](Self::forward)).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    scale: Tensor<1>,
    shift: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &mut Loader, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(
            w.tensor(&format!("{prefix}.weight"), [dim])?,
            w.tensor(&format!("{prefix}.bias"), [dim])?,
            eps,
        ))
    }

    /// A norm over `gamma.dims()[0]` features with the given scale and shift, kept in f32
    /// (see [`forward`](Self::forward)).
    pub fn new(gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Self {
        Self {
            scale: to_dtype(gamma, DType::F32),
            shift: to_dtype(beta, DType::F32),
            eps,
        }
    }

    /// Computed in f32 whatever `x`'s dtype, then cast back ([`normalize`]): in f16 a value
    /// 256 from its row's mean already squares past f16's largest value. `x` may be a strided
    /// view (the tokens of a transformer's input projection are a transposed one).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        normalize(
            x,
            self.scale.clone(),
            self.shift.clone(),
            Rows::Last,
            self.eps,
            false,
        )
    }

    /// `plus + gᵀ ∂norm/∂x` at `x` in closed form ([`normalize_pull_back`], with `plus` as
    /// for [`GroupNorm::pull_back`]); `g` may have more rows than `x`.
    pub fn pull_back(&self, x: &Tensor<3>, g: Tensor<3>, plus: Option<Tensor<3>>) -> Tensor<3> {
        normalize_pull_back(
            x.clone(),
            g,
            self.scale.clone(),
            self.shift.clone(),
            Rows::Last,
            self.eps,
            false,
            plus,
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{layer_wave as wave, max_abs};
    use burn::tensor::Device;

    #[test]
    fn linear_pull_back_equals_autodiff() {
        let device = Device::flex();
        let lin = Linear::new(wave([5, 3], 0.7, &device), Some(wave([3], 1.9, &device)));
        let x = wave([2, 4, 5], 0.2, &device).autodiff().require_grad();
        let g = wave([2, 4, 3], 2.4, &device);
        let grads = (lin.forward(x.clone()) * g.clone()).sum().backward();
        let want = x.grad(&grads).expect("the input's gradient");
        let diff = max_abs(lin.pull_back(g) - want);
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn norm_pull_backs_equal_autodiff() {
        use crate::model::pullback::pullback_wide;
        let device = Device::flex();
        // Inputs with a non-zero mean and unequal spread per group, one row pulled back with
        // two cotangent rows, as in the guidance's lean backward.
        let x = wave([1, 8, 5, 3], 0.3, &device) * 2.5 + 0.7;
        let g = wave([2, 8, 5, 3], 2.1, &device);
        let gn = GroupNorm::new(wave([8], 1.3, &device), wave([8], 0.4, &device), 4, 1e-5);
        for then_silu in [false, true] {
            let want = pullback_wide(&x, g.clone(), |x| {
                let y = gn.forward(x);
                if then_silu { silu(y) } else { y }
            });
            let plus = wave([2, 8, 5, 3], 0.8, &device);
            let want = want + plus.clone();
            let got = gn.pull_back(&x, g.clone(), then_silu, Some(plus));
            assert_eq!(got.dims(), [2, 8, 5, 3]);
            let diff = max_abs(got - want.clone()) / max_abs(want);
            assert!(diff < 1e-5, "silu {then_silu}: {diff}");
        }
        let ln = LayerNorm::new(wave([6], 0.9, &device), wave([6], 0.2, &device), 1e-5);
        let x = wave([1, 4, 6], 1.7, &device) * 3.0 - 1.1;
        let g = wave([2, 4, 6], 0.5, &device);
        let want = pullback_wide(&x, g.clone(), |x| ln.forward(x));
        let plus = wave([2, 4, 6], 1.9, &device);
        let want = want + plus.clone();
        let got = ln.pull_back(&x, g, Some(plus));
        let scale = max_abs(want.clone());
        let diff = max_abs(got - want) / scale;
        assert!(diff < 1e-5, "layer norm: {diff}");
    }
}
