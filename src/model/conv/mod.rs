//! 2-D convolutions, computed by burn's kernels or as im2col + one matrix product, and their
//! hand-written pull-backs for the lean guidance.

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};
use std::sync::atomic::{AtomicU8, Ordering};

use super::nn::to_dtype;
use super::products::ProductSplit;
use super::windows::conv_windows;
use crate::error::Result;
use crate::weights::Loader;

/// A 2-D convolution with PyTorch's `[out, in, k, k]` weight layout.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kernel: Kernel,
}

/// The weight in the layout of the way the convolution is computed.
#[derive(Debug, Clone)]
enum Kernel {
    /// burn's `conv2d`, weight `[out, in, k, k]`.
    Direct {
        weight: Tensor<4>,
        bias: Option<Tensor<1>>,
        options: ConvOptions<2>,
    },
    /// A stride-1 convolution as one matrix product over shifted copies of the input (im2col):
    /// weight `[1, out, k * k * in]`, ordered (dy, dx, in) like the copies, and the bias shaped
    /// `[1, out, 1]` once here: a reshape in burn-fusion's stream ends a fused segment, and
    /// one between the matrix product and the bias add left the add a kernel of its own.
    Gemm {
        weight: Tensor<3>,
        bias: Option<Tensor<3>>,
        kernel: usize,
        padding: usize,
        stride: usize,
    },
}

/// How stride-1 convolutions are computed, for the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvStrategy {
    /// [`Gemm`](ConvStrategy::Gemm) on a native GPU, [`Direct`](ConvStrategy::Direct) on the
    /// CPU and in the browser (where the page sets the faster of the two, timed on the user's
    /// GPU before the model loads: [`conv_choice`](super::conv_choice)).
    #[default]
    Auto,
    /// burn's own convolution kernels.
    Direct,
    /// im2col and one matrix product: burn's WGSL matmul runs far closer to the GPU's peak than
    /// its WGSL convolution (issue 5's probe: 18 against 1.5 TFLOP/s on an H200).
    Gemm,
}

static CONV_STRATEGY: AtomicU8 = AtomicU8::new(0);

/// Sets how convolutions loaded from now on are computed (the CLI's `--conv`).
pub fn set_conv_strategy(strategy: ConvStrategy) {
    CONV_STRATEGY.store(strategy as u8, Ordering::Relaxed);
}

/// Whether stride-1 convolutions loaded onto `device` from now on use im2col + matmul.
pub fn uses_gemm(device: &Device) -> bool {
    match CONV_STRATEGY.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        // Not in the browser unless timed faster there (`conv_choice`): burn runs without
        // autotune, and on SwiftShader the browser tests' edits took 50-65 % longer this way.
        _ => crate::device::is_native_gpu(device),
    }
}

/// The largest im2col buffer one matrix product takes; a larger one is cut into bands of output
/// rows, so that no buffer nears WebGPU's binding limits (a VAE convolution at 512 px would
/// otherwise need 1.2 GB).
const GEMM_BAND_BYTES: usize = 64 << 20;

/// The windows' layout a product reads: the forward's, `(dy, dx, in)`, or the pull-back's
/// (see [`conv_windows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Windows {
    Forward,
    Adjoint,
}

/// A `k x k` convolution with `padding` zeros on every side and the given `stride`, computed
/// as `weight [1, out, k*k*in] x im2col(x) [b, k*k*in, oh*ow]` in bands of output rows, plus `plus`,
/// `[B or 1, out, 1]` (one value per channel) or `[B, out, h*w]` (a whole image), added in the
/// matrix product's kernel. `windows` says how `weight`'s columns are ordered.
#[allow(clippy::too_many_arguments)]
fn gemm_in_bands(
    x: Tensor<4>,
    weight: &Tensor<3>,
    bias: Option<&Tensor<3>>,
    plus: Option<&Tensor<3>>,
    [kernel, padding, stride]: [usize; 3],
    windows: Windows,
    band_bytes: usize,
    split: ProductSplit,
) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let out = weight.dims()[1];
    let side = |n: usize| (n + 2 * padding - kernel) / stride + 1;
    let (oh, ow) = (side(h), side(w));
    let product = |cols: Tensor<3>, r0: usize, rows: usize| {
        let plus = plus.map(|p| {
            if p.dims()[2] == 1 || rows == oh {
                p.clone()
            } else {
                p.clone().narrow(2, r0 * ow, rows * ow)
            }
        });
        product_plus(weight, bias, cols, plus, split)
    };
    if kernel == 1 && padding == 0 && stride == 1 {
        product(x.reshape([b, c, h * w]), 0, oh).reshape([b, out, oh, ow])
    } else {
        let row_bytes = b * kernel * kernel * c * ow * x.dtype().size();
        let band = (band_bytes / row_bytes.max(1)).clamp(1, oh);
        let adjoint = windows == Windows::Adjoint;
        let band_at = |r0: usize, rows: usize| {
            let cols = conv_windows(x.clone(), kernel, padding, stride, r0, rows, adjoint);
            product(cols, r0, rows).reshape([b, out, rows, ow])
        };
        if band >= oh {
            return band_at(0, oh);
        }
        // Each band is written into the output as soon as it is made, so that it is freed
        // before the next band's windows are allocated. Concatenated at the end instead, every
        // band stayed alive beside the windows that came after it: between the short-lived
        // windows, long-lived pieces that spread the pool's pages.
        let (device, dtype) = (x.device(), x.dtype());
        (0..oh).step_by(band).fold(
            Tensor::empty([b, out, oh, ow], (&device, dtype)),
            |y, r0| {
                let rows = band.min(oh - r0);
                y.slice_assign([0..b, 0..out, r0..r0 + rows, 0..ow], band_at(r0, rows))
            },
        )
    }
}

/// `weight x cols + bias + plus`, the sums added before the product is reshaped to an image,
/// so that they run in its kernel (burn-fusion ends a fused segment at a reshape).
fn product_plus(
    weight: &Tensor<3>,
    bias: Option<&Tensor<3>>,
    cols: Tensor<3>,
    plus: Option<Tensor<3>>,
    split: ProductSplit,
) -> Tensor<3> {
    let y = split.matmul(weight.clone(), cols);
    let y = match bias {
        Some(bias) => y + bias.clone(),
        None => y,
    };
    match plus {
        Some(p) => y + p,
        None => y,
    }
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
        let bias = w.tensor(&format!("{prefix}.bias"), [spec.c_out])?;
        let gemm = uses_gemm(w.device());
        // The product's weight layout is a copy of the loaded one: made as weights are.
        Ok(crate::device::persistent(
            w.device(),
            (weight, bias),
            |(weight, bias)| Self::new(weight, Some(bias), spec, gemm),
        ))
    }

    /// A convolution of `weight` `[out, in, k, k]`, as im2col + matmul where `gemm` is asked
    /// and the convolution allows it (the same padding on both sides), else through burn's
    /// `conv2d`.
    pub fn new(weight: Tensor<4>, bias: Option<Tensor<1>>, spec: ConvSpec, gemm: bool) -> Self {
        let k = spec.kernel;
        let (p0, p1) = spec.padding;
        let kernel = if gemm && p0 == p1 {
            Kernel::Gemm {
                weight: weight
                    .permute([0, 2, 3, 1])
                    .reshape([1, spec.c_out, k * k * spec.c_in]),
                bias: bias.map(|b| b.reshape([1, spec.c_out, 1])),
                kernel: k,
                padding: p0,
                stride: spec.stride,
            }
        } else {
            Kernel::Direct {
                weight,
                bias,
                options: ConvOptions::new_with_padding(
                    [spec.stride; 2],
                    [spec.padding; 2],
                    [1, 1],
                    1,
                ),
            }
        };
        Self { kernel }
    }

    /// Whether [`pull_back`](Self::pull_back) can pull this convolution back.
    pub fn has_pull_back(&self) -> bool {
        match &self.kernel {
            Kernel::Direct {
                weight, options, ..
            } => {
                let k = weight.dims()[2];
                let (p, after) = options.padding[0];
                options.stride == [1, 1]
                    && options.dilation == [1, 1]
                    && options.groups == 1
                    && options.padding.iter().all(|&pad| pad == (p, after))
                    && p == after
                    && p < k
            }
            Kernel::Gemm {
                kernel,
                padding,
                stride,
                ..
            } => *stride == 1 && padding < kernel,
        }
    }

    /// `gᵀ ∂conv/∂x` for a stride-1 convolution with the same padding on every side: the
    /// convolution of `g` with the kernel flipped and its in/out axes swapped, computed the way
    /// the forward is. It needs nothing of `x`, so the guidance keeps no input for it. `None`
    /// for any other convolution.
    pub fn pull_back(&self, g: Tensor<4>) -> Option<Tensor<4>> {
        self.pull_back_split(g, ProductSplit::current())
    }

    /// [`pull_back`](Self::pull_back) with its product split as `split` says.
    fn pull_back_split(&self, g: Tensor<4>, split: ProductSplit) -> Option<Tensor<4>> {
        if !self.has_pull_back() {
            return None;
        }
        match &self.kernel {
            Kernel::Direct {
                weight, options, ..
            } => {
                let k = weight.dims()[2];
                let p = options.padding[0].0;
                let flipped = weight.clone().swap_dims(0, 1).flip([2, 3]);
                let pad = k - 1 - p;
                Some(conv2d(
                    g,
                    flipped,
                    None,
                    ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
                ))
            }
            Kernel::Gemm {
                weight,
                kernel,
                padding,
                ..
            } => {
                let (k, p) = (*kernel, *padding);
                let [_, out, cols] = weight.dims();
                let c_in = cols / (k * k);
                // [1, out, (dy, dx, in)] seen as [1, (out, dy, dx), in], transposed: a view
                // of the forward weight that the adjoint windows (flipped, (out, dy, dx)
                // ordered) are multiplied by, where a flipped copy was made on every call.
                let weight = weight
                    .clone()
                    .reshape([1, out * k * k, c_in])
                    .swap_dims(1, 2);
                Some(gemm_in_bands(
                    g,
                    &weight,
                    None,
                    None,
                    [k, k - 1 - p, 1],
                    Windows::Adjoint,
                    GEMM_BAND_BYTES,
                    split,
                ))
            }
        }
    }

    /// Computes in `x`'s dtype; weights of another dtype are cast for the call (the VAE's f32
    /// retry runs on its f16 weights).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_inner(x, None, ProductSplit::current())
    }

    /// `forward(x) + plus`, with `plus` `[B or 1, out, 1]` (one value per channel) or
    /// `[B, out, h*w]` (an output-sized image, flattened): computed as im2col + matmul, the sum
    /// runs in the product's kernel instead of one of its own.
    pub fn forward_plus(&self, x: Tensor<4>, plus: Tensor<3>) -> Tensor<4> {
        self.forward_inner(x, Some(plus), ProductSplit::current())
    }

    /// [`forward_plus`](Self::forward_plus) of an image given flat, `[B, C, H·W]`, which may
    /// be a transposed view of tokens: a 1x1 convolution computed as a matrix product reads
    /// the view as it is, where reshaping it to an image first would copy it.
    pub fn forward_flat_plus(
        &self,
        x: Tensor<3>,
        [h, w]: [usize; 2],
        plus: Tensor<3>,
    ) -> Tensor<4> {
        match &self.kernel {
            Kernel::Gemm {
                weight,
                bias,
                kernel: 1,
                padding: 0,
                stride: 1,
            } => {
                let dtype = x.dtype();
                let [b, _, _] = x.dims();
                let bias = bias.clone().map(|b| to_dtype(b, dtype));
                let y = product_plus(
                    &to_dtype(weight.clone(), dtype),
                    bias.as_ref(),
                    x,
                    Some(plus),
                    ProductSplit::current(),
                );
                let out = y.dims()[1];
                y.reshape([b, out, h, w])
            }
            _ => {
                let [b, c, _] = x.dims();
                self.forward_plus(x.reshape([b, c, h, w]), plus)
            }
        }
    }

    fn forward_inner(
        &self,
        x: Tensor<4>,
        plus: Option<Tensor<3>>,
        split: ProductSplit,
    ) -> Tensor<4> {
        let dtype = x.dtype();
        match &self.kernel {
            Kernel::Direct {
                weight,
                bias,
                options,
            } => {
                let y = conv2d(
                    x,
                    to_dtype(weight.clone(), dtype),
                    bias.clone().map(|b| to_dtype(b, dtype)),
                    options.clone(),
                );
                add_image(y, plus)
            }
            Kernel::Gemm {
                weight,
                bias,
                kernel,
                padding,
                stride,
            } => {
                // Under autodiff (the guidance's pull-back through a downsampler, which has
                // no hand-written one) a strided convolution goes through burn's conv2d, as
                // before it was computed as a product: autodiff of the windows' composition
                // launched 42 kernels more per lean evaluation than burn's transposed
                // convolution.
                if *stride != 1 && x.is_autodiff() {
                    let [_, out, cols] = weight.dims();
                    let (k, c_in) = (*kernel, cols / (kernel * kernel));
                    let weight = weight
                        .clone()
                        .reshape([out, k, k, c_in])
                        .permute([0, 3, 1, 2]);
                    let y = conv2d(
                        x,
                        to_dtype(weight, dtype),
                        bias.clone().map(|b| to_dtype(b.reshape([out]), dtype)),
                        ConvOptions::new([*stride; 2], [*padding; 2], [1, 1], 1),
                    );
                    return add_image(y, plus);
                }
                gemm_in_bands(
                    x,
                    &to_dtype(weight.clone(), dtype),
                    bias.clone().map(|b| to_dtype(b, dtype)).as_ref(),
                    plus.as_ref(),
                    [*kernel, *padding, *stride],
                    Windows::Forward,
                    GEMM_BAND_BYTES,
                    split,
                )
            }
        }
    }
}

/// `y + plus`, with `plus` `[B or 1, out, 1]` or `[B, out, h*w]` as in
/// [`Conv2d::forward_plus`].
fn add_image(y: Tensor<4>, plus: Option<Tensor<3>>) -> Tensor<4> {
    match plus {
        Some(p) => {
            let [_, out, h, w] = y.dims();
            let [pb, _, n] = p.dims();
            let (ph, pw) = if n == 1 { (1, 1) } else { (h, w) };
            debug_assert!(n == 1 || n == h * w, "plus {n} against {h}x{w}");
            y + p.reshape([pb, out, ph, pw])
        }
        None => y,
    }
}

#[cfg(test)]
mod tests;
