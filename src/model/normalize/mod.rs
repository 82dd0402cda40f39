//! Group and layer normalisation, with the scale and shift and an optional SiLU, in one
//! launch: a cube per normalised row takes the row's mean and variance in f32 with a reduction
//! in workgroup memory, then writes the normalised row in the input's dtype.
//!
//! Composed of burn's ops a norm took a reduction for its statistics and an elementwise
//! kernel for the rest (in f32 up to five launches, with the casts), and a UNet pass has 109
//! norms. The composition stays for burn's CPU backend and for tensors that autodiff tracks
//! (the tape guidance), where it is differentiable as it is. The workgroup reduction uses no
//! subgroup operations, which the browser does not have.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Scalar, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::untile;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

/// Which values of `x` `[b, m, n]` are normalised together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// GroupNorm: `x` is `[b, channels, pixels]` and each of `groups` runs of
    /// `channels / groups` channels, all their pixels, is one row; the scale and shift are
    /// per channel (the middle axis).
    Groups(usize),
    /// LayerNorm: each `x[b, i, ..]` is one row; the scale and shift are per feature (the
    /// last axis).
    Last,
}

impl Rows {
    /// The extension's plain arguments for `x` `[b, m, n]`: the groups per batch item, and
    /// whether the scale and shift run along the last axis (a layer norm's `m` one-row groups).
    fn groups_and_last(self, x: &Tensor<3>) -> (usize, bool) {
        match self {
            Rows::Groups(groups) => (groups, false),
            Rows::Last => (x.dims()[1], true),
        }
    }
}

/// `x` `[b, m, n]` normalised by [`Rows`] (biased variance, as PyTorch's norms), times
/// `gamma` plus `beta`, then SiLU where `silu`; in `x`'s dtype, the statistics and the
/// arithmetic in f32 whatever the dtypes of `x` and of `gamma` and `beta`. `x` may be a
/// strided view; the result is contiguous.
pub fn normalize(
    x: Tensor<3>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    rows: Rows,
    eps: f64,
    silu: bool,
) -> Tensor<3> {
    let (groups, last) = rows.groups_and_last(&x);
    Tensor::from_dispatch(Dispatch::normalize(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        last,
        eps,
        silu,
    ))
}

/// `gᵀ ∂f/∂x` at `x` for `f` [`normalize`] with the same arguments, in closed form: with `x̂`
/// the normalised input and `ĝ = γ ⊙ gᵀ∂f/∂y` at the affine output `y` (through SiLU where
/// `silu`), `rstd · (ĝ − mean ĝ − x̂ · mean(ĝ x̂))` per row. `g` may have more rows than `x`
/// (one per energy, `x`'s batch repeated); `x`'s statistics are then taken again for each.
/// `plus`, `g`'s shape, is added to the result where given: most callers sum the pull-back
/// with the cotangent of a residual path, which is then no launch of its own. In `x`'s dtype,
/// the arithmetic in f32; `x`, `g` and `plus` may be strided views.
#[allow(clippy::too_many_arguments)]
pub fn normalize_pull_back(
    x: Tensor<3>,
    g: Tensor<3>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    rows: Rows,
    eps: f64,
    silu: bool,
    plus: Option<Tensor<3>>,
) -> Tensor<3> {
    let (groups, last) = rows.groups_and_last(&x);
    // Without a sum the kernel takes `g` in its place and reads nothing of it.
    let (add, plus) = match plus {
        Some(plus) => (true, plus),
        None => (false, g.clone()),
    };
    Tensor::from_dispatch(Dispatch::normalize_pull_back(
        x.into_dispatch(),
        g.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        last,
        eps,
        silu,
        add,
        plus.into_dispatch(),
    ))
}

#[backend_extension(Cube, Fusion, Flex: cfg(not(target_family = "wasm")), Autodiff)]
pub trait NormOps: Backend {
    /// See [`normalize`]; `last` is [`Rows::Last`], with `groups` then `x`'s middle axis.
    /// The default composes burn's ops; the GPU runs one kernel.
    #[fusion(dtype = x, shape = x)]
    fn normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        last: bool,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let shape = x.shape();
        let (b, m, n) = (shape[0], shape[1], shape[2]);
        let dtype = x.dtype();
        let (x_hat, _) = composed::normalized::<Self>(x, groups, eps);
        let normed = Self::float_reshape(x_hat, Shape::new([b, m, n]));
        let (gamma, beta) = composed::affine::<Self>(gamma, beta, [m, n], last);
        let y = Self::float_add(Self::float_mul(normed, gamma), beta);
        let y = if silu {
            Self::float_mul(y.clone(), Self::sigmoid(y))
        } else {
            y
        };
        composed::cast::<Self>(y, dtype)
    }

    /// See [`normalize_pull_back`]. The default composes burn's ops; the GPU runs one kernel.
    #[fusion(dtype = x, shape = g)]
    #[allow(clippy::too_many_arguments)]
    fn normalize_pull_back(
        x: FloatTensor<Self>,
        g: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        last: bool,
        eps: f64,
        silu: bool,
        add: bool,
        plus: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let dtype = x.dtype();
        let (bx, shape) = (x.shape()[0], g.shape());
        let (b, m, n) = (shape[0], shape[1], shape[2]);
        let x = if bx == b {
            x
        } else {
            Self::float_repeat_dim(x, 0, b / bx)
        };
        let (x_hat, rstd) = composed::normalized::<Self>(x, groups, eps);
        let (gamma, beta) = composed::affine::<Self>(gamma, beta, [m, n], last);
        let g = composed::cast::<Self>(g, DType::F32);
        let g_y = if silu {
            let y = Self::float_reshape(x_hat.clone(), Shape::new([b, m, n]));
            let y = Self::float_add(Self::float_mul(y, gamma.clone()), beta);
            let s = Self::sigmoid(y.clone());
            // SiLU'(y) = σ(y) (1 + y (1 − σ(y))).
            let one_minus = Self::float_add_scalar(Self::float_neg(s.clone()), Scalar::from(1.0));
            let slope = Self::float_add_scalar(Self::float_mul(y, one_minus), Scalar::from(1.0));
            Self::float_mul(g, Self::float_mul(s, slope))
        } else {
            g
        };
        let g_hat = Self::float_reshape(Self::float_mul(g_y, gamma), x_hat.shape());
        let m1 = Self::float_mean_dim(g_hat.clone(), 2);
        let m2 = Self::float_mean_dim(Self::float_mul(g_hat.clone(), x_hat.clone()), 2);
        let centred = Self::float_sub(Self::float_sub(g_hat, m1), Self::float_mul(x_hat, m2));
        let out = Self::float_reshape(Self::float_mul(centred, rstd), Shape::new([b, m, n]));
        let out = if add {
            Self::float_add(out, composed::cast::<Self>(plus, DType::F32))
        } else {
            out
        };
        composed::cast::<Self>(out, dtype)
    }
}

/// The pieces the trait's default bodies share, in f32 (the attention pull-back's too).
pub(crate) mod composed {
    use super::*;

    /// `t` in `dtype`, with no cast op when it already is.
    pub(crate) fn cast<B: Backend>(t: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
        if t.dtype() == dtype {
            t
        } else {
            B::float_cast(t, FloatDType::from(dtype))
        }
    }

    /// `x` `[b, m, n]` as rows `[b, groups, (m / groups) · n]`, normalised in f32, and
    /// `1 / sqrt(variance + eps)` per row.
    pub(super) fn normalized<B: Backend>(
        x: FloatTensor<B>,
        groups: usize,
        eps: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let shape = x.shape();
        let rows = Shape::new([shape[0], groups, (shape[1] / groups) * shape[2]]);
        let rows = B::float_reshape(cast::<B>(x, DType::F32), rows);
        let mean = B::float_mean_dim(rows.clone(), 2);
        let centred = B::float_sub(rows, mean);
        let var = B::float_mean_dim(B::float_mul(centred.clone(), centred.clone()), 2);
        let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(var, Scalar::from(eps))));
        (B::float_mul(centred, rstd.clone()), rstd)
    }

    /// The scale and shift in f32, shaped to broadcast over `[b, m, n]`: along the last axis
    /// with `last`, else along the middle.
    pub(super) fn affine<B: Backend>(
        gamma: FloatTensor<B>,
        beta: FloatTensor<B>,
        [m, n]: [usize; 2],
        last: bool,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let shape = Shape::new(if last { [1, 1, n] } else { [1, m, 1] });
        let shaped = |t| B::float_reshape(cast::<B>(t, DType::F32), shape.clone());
        (shaped(gamma), shaped(beta))
    }
}

#[cfg(not(target_family = "wasm"))]
impl NormOps for burn::backend::Flex {}

impl<B: Backend + NormOps, C: CheckpointStrategy> NormOps for Autodiff<B, C> {}

/// Units per cube: a power of two (the reduction halves them), enough that each unit reads a
/// few values of a row, at most 1024 and the device's own limit (WebGPU guarantees 256).
/// A 64x64 group of 10 channels is 40960 values for one cube, so a GPU hides each unit's
/// memory latency only behind the cube's other units: as many as the device allows.
fn units_per_row(n: usize, device_max: u32) -> usize {
    let cap = (device_max as usize).clamp(1, 1024);
    let cap = 1 << cap.ilog2();
    (n / 4).next_power_of_two().clamp(32.min(cap), cap)
}

/// How a norm kernel over rows of `groups` groups of a `shape` tensor launches on `x`'s device:
/// the number of rows, the units per cube, a grid of one cube per row (over two axes when one
/// does not hold them; the cubes past the last row then skip their work), and the contiguous
/// output, `shape` in `x`'s dtype.
struct Launch {
    rows: usize,
    units: usize,
    cube_dim: CubeDim,
    cube_count: CubeCount,
    output: FloatTensor<CubeBackend>,
}

impl Launch {
    fn new(x: &FloatTensor<CubeBackend>, shape: Shape, groups: usize) -> Self {
        let rows = shape[0] * groups;
        let row_len = (shape[1] / groups) * shape[2];
        let units = units_per_row(row_len, x.client.properties().hardware.max_units_per_cube);
        let cube_dim = CubeDim::new_1d(units as u32);
        let cube_count = calculate_cube_count_elemwise(&x.client, rows * units, cube_dim);
        let output =
            empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
        Self {
            rows,
            units,
            cube_dim,
            cube_count,
            output,
        }
    }
}

impl NormOps for CubeBackend {
    fn normalize(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        last: bool,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let (x, gamma, beta) = (untile(x), untile(gamma), untile(beta));
        let at = Launch::new(&x, x.meta.shape().clone(), groups);
        let dtypes = [x.dtype, gamma.dtype].map(dtype_to_storage_type);
        kernel::norm_kernel::launch(
            &at.output.client,
            at.cube_count,
            at.cube_dim,
            x.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            at.output.clone().into_tensor_arg(),
            at.rows,
            groups,
            eps as f32,
            at.units,
            last,
            silu,
            dtypes,
        );
        at.output
    }

    fn normalize_pull_back(
        x: FloatTensor<Self>,
        g: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        last: bool,
        eps: f64,
        silu: bool,
        add: bool,
        plus: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (x, g, gamma, beta) = (untile(x), untile(g), untile(gamma), untile(beta));
        let plus = untile(plus);
        let at = Launch::new(&x, g.meta.shape().clone(), groups);
        let dtypes = [x.dtype, g.dtype, gamma.dtype, plus.dtype].map(dtype_to_storage_type);
        kernel::norm_pull_back_kernel::launch(
            &at.output.client,
            at.cube_count,
            at.cube_dim,
            x.into_tensor_arg(),
            g.into_tensor_arg(),
            gamma.into_tensor_arg(),
            beta.into_tensor_arg(),
            plus.into_tensor_arg(),
            at.output.clone().into_tensor_arg(),
            at.rows,
            groups,
            eps as f32,
            at.units,
            last,
            silu,
            add,
            dtypes,
        );
        at.output
    }
}

mod kernel;

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn wave(shape: [usize; 3], seed: f32, device: &Device) -> Tensor<3> {
        crate::model::wave(shape, seed, [3.0, 1.5], device)
    }

    /// The GPU kernel against the composition of burn's ops (what an autodiff-tracked tensor
    /// takes) on the same device: group rows and last-axis rows, with and without SiLU, a
    /// transposed (strided) input, rows longer and shorter than a cube's units, f32 and f16
    /// inputs, f16 and f32 scales. Both compute in f32, summing in different orders, so
    /// relative to the largest output they agree to f32 rounding (about 1e-6) in f32; in f16
    /// each rounds its f32 result once, so they may land an f16 step apart, 2^-10 of the value
    /// or less: 2e-3 allows two.
    #[test]
    fn kernel_equals_composed_norm() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        for (dtype, scale_dtype, tolerance) in [
            (DType::F32, DType::F32, 1e-5),
            (DType::F16, DType::F16, 2e-3),
            (DType::F16, DType::F32, 2e-3),
        ] {
            let cases: [([usize; 3], Rows, bool); 6] = [
                ([2, 12, 40], Rows::Groups(4), true),
                ([2, 12, 300], Rows::Groups(3), false),
                ([1, 6, 3], Rows::Groups(2), true),
                ([2, 7, 20], Rows::Last, false),
                ([3, 5, 700], Rows::Last, true),
                ([1, 8, 600], Rows::Groups(2), true),
            ];
            for (shape, rows, silu) in cases {
                for transposed in [false, true] {
                    let [b, m, n] = shape;
                    let x = if transposed {
                        wave([b, n, m], 0.37, &device).swap_dims(1, 2)
                    } else {
                        wave(shape, 0.37, &device)
                    };
                    let x = x.cast(dtype);
                    let channels = if rows == Rows::Last { n } else { m };
                    let gamma = wave([1, 1, channels], 0.11, &device)
                        .reshape([channels])
                        .cast(scale_dtype);
                    let beta = wave([1, 1, channels], 0.23, &device)
                        .reshape([channels])
                        .cast(scale_dtype);
                    let at =
                        |x: Tensor<3>| normalize(x, gamma.clone(), beta.clone(), rows, 1e-5, silu);
                    let ours = at(x.clone());
                    let composed = at(x.clone().autodiff().require_grad()).without_autodiff();
                    assert_eq!(ours.dims(), shape);
                    assert_eq!(ours.dtype(), dtype);
                    let composed = composed.cast(DType::F32);
                    let scale = composed.clone().abs().max().into_scalar::<f32>();
                    let diff = (ours.cast(DType::F32) - composed)
                        .abs()
                        .max()
                        .into_scalar::<f32>();
                    assert!(
                        diff <= tolerance * scale,
                        "{dtype:?}/{scale_dtype:?} {shape:?} {rows:?} silu {silu} transposed \
                         {transposed}: differs by {diff} of {scale}"
                    );
                }
            }
        }
    }

    /// The GPU pull-back kernel against autodiff of the composition on the same device, at
    /// rows of one input pulled back with more cotangent rows (as the guidance's lean backward
    /// does, from one and from two input rows), with and without SiLU, with and without a
    /// residual cotangent added, transposed inputs and cotangents. f32 only: autodiff's own f16
    /// rounding would set the tolerance, not the kernel. Relative to the largest gradient;
    /// both sum in f32 in different orders, the composition over more steps.
    #[test]
    fn pull_back_kernel_equals_autodiff() {
        use crate::model::pullback::pullback_wide;
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        let cases: [([usize; 3], usize, Rows, bool); 5] = [
            ([1, 12, 40], 2, Rows::Groups(4), true),
            ([2, 12, 300], 4, Rows::Groups(3), false),
            ([1, 6, 3], 1, Rows::Groups(2), true),
            ([1, 7, 20], 2, Rows::Last, false),
            ([2, 5, 700], 4, Rows::Last, false),
        ];
        for (shape, g_rows, rows, silu) in cases {
            for transposed in [false, true] {
                let [b, m, n] = shape;
                let made = |rows: usize, seed: f32| {
                    if transposed {
                        wave([rows, n, m], seed, &device).swap_dims(1, 2)
                    } else {
                        wave([rows, m, n], seed, &device)
                    }
                };
                let (x, g) = (made(b, 0.37), made(g_rows, 0.71));
                let channels = if rows == Rows::Last { n } else { m };
                let gamma = wave([1, 1, channels], 0.11, &device).reshape([channels]);
                let beta = wave([1, 1, channels], 0.23, &device).reshape([channels]);
                let want = pullback_wide(&x, g.clone(), |x| {
                    normalize(x, gamma.clone(), beta.clone(), rows, 1e-5, silu)
                });
                // A residual cotangent to add, with the transposed inputs; none with the others.
                let plus = transposed.then(|| made(g_rows, 1.3));
                let want = match &plus {
                    Some(plus) => want + plus.clone(),
                    None => want,
                };
                let got =
                    normalize_pull_back(x, g, gamma.clone(), beta.clone(), rows, 1e-5, silu, plus);
                assert_eq!(got.dims(), [g_rows, m, n]);
                let scale = want.clone().abs().max().into_scalar::<f32>();
                let diff = (got - want).abs().max().into_scalar::<f32>() / scale;
                assert!(
                    diff < 1e-4,
                    "{shape:?} to {g_rows} rows {rows:?} silu {silu} transposed {transposed}: \
                     differs by {diff} of {scale}"
                );
            }
        }
    }
}
