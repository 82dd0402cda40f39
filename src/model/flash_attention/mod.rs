//! Multi-head attention, `softmax(q kᵀ / √d) v`, and its pull-back as kernels of our own that
//! never write a score: FlashAttention's forward and its recomputing backward (Dao, 2023).
//!
//! Composed of burn's ops (what [`AttentionPlan`] does) a 64x64 self-attention materialises a
//! 4096x4096 score chunk per head, and its pull-back that chunk's softmax and two more of the
//! same size, in about ten launches per chunk, around copies that lay the tokens out by heads
//! and back. Here the forward is one kernel: a unit per query walks the keys, keeping the
//! softmax's running maximum and sum (rescaling what it summed when a larger score comes), so
//! one pass over the keys is enough. The pull-back is two: the same walk per query for the
//! queries' gradient, which also writes each query's log-sum-exp, then a walk over the queries
//! per key for the keys' and values' gradients. All read `[b, n, heads · d]` tokens where they
//! stand (strided views included) and stage a tile of the other side's rows in workgroup
//! memory, sized under WebGPU's guaranteed 16 KiB.
//!
//! The trait's default bodies (burn's CPU backend, autodiff-tracked tensors) compose burn's
//! ops with every score of a call at once; callers keep [`AttentionPlan`]'s chunks there,
//! which bound the memory.
//!
//! [`AttentionPlan`]: crate::model::attention::AttentionPlan

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Scalar, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::prelude::{CubeCount, CubeDim};
use burn_cubecl::kernel::untile;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use crate::model::normalize::composed::cast;

/// The gradients of multi-head attention with respect to its projected inputs, given its
/// output `o` and the cotangent `g` at it: `[parts, rows, nq, c]`, part 0 the queries'
/// gradient and, with `keys`, parts 1 and 2 the keys' and values'.
///
/// `q` `[b, nq, c]`, `k` and `v` `[b, nk, c]`, `o` `[b, nq, c]` are tokens with `heads` heads
/// side by side along the features (diffusers' layout before its head split); `g` `[rows, nq,
/// c]` may have a multiple of their batch (one row group per energy of the guidance), each
/// pulled back against the same kept tensors. `keys` needs `nk == nq` (self-attention); without
/// it the keys' and values' gradients are not computed at all (cross-attention over a constant
/// context). In `q`'s dtype, the arithmetic in f32.
pub fn attention_pull_back(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    o: Tensor<3>,
    g: Tensor<3>,
    heads: usize,
    keys: bool,
) -> Tensor<4> {
    debug_assert!(
        !keys || q.dims()[1] == k.dims()[1],
        "keys' gradients need nk == nq"
    );
    Tensor::from_dispatch(Dispatch::attention_pull_back(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        o.into_dispatch(),
        g.into_dispatch(),
        heads,
        keys,
    ))
}

/// Multi-head attention `softmax(q kᵀ / √d) v` of `q` `[b, nq, c]` over `k`, `v` `[b, nk, c]`,
/// tokens with `heads` heads side by side along the features, as one kernel that never writes
/// a score: `[b, nq, c]`, contiguous, in `q`'s dtype, the arithmetic in f32. The inputs may be
/// strided views.
pub fn flash_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    debug_assert_eq!(
        q.dims()[0],
        k.dims()[0],
        "keys and values of every query row"
    );
    Tensor::from_dispatch(Dispatch::flash_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        heads,
    ))
}

/// The widest head the kernels take: a unit keeps a head's rows in registers (four of them in
/// the key kernel), and SD 1.5's widest is 160.
pub const WIDEST_HEAD: usize = 160;

/// Whether [`flash_attention`] and [`attention_pull_back`] run as kernels on `device` for heads
/// `head_width` wide: a cubecl GPU, not autodiff (where the trait's composition would hold
/// every score of a call at once), heads no wider than [`WIDEST_HEAD`].
pub fn runs_as_kernels(device: &burn::tensor::Device, head_width: usize) -> bool {
    head_width <= WIDEST_HEAD
        && matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
}

fn pull_back_shape(
    q: &Shape,
    _k: &Shape,
    _v: &Shape,
    _o: &Shape,
    g: &Shape,
    _heads: &usize,
    keys: &bool,
) -> Shape {
    Shape::new([if *keys { 3 } else { 1 }, g[0], q[1], q[2]])
}

fn forward_shape(q: &Shape, _k: &Shape, v: &Shape, _heads: &usize) -> Shape {
    Shape::new([q[0], q[1], v[2]])
}

#[backend_extension(Cube, Fusion, Flex: cfg(not(target_family = "wasm")), Autodiff)]
pub trait FlashAttentionOps: Backend {
    /// See [`flash_attention`]. The default composes burn's ops with every score of the call
    /// materialised; the GPU runs one kernel.
    #[fusion(dtype = q, shape = forward_shape(q, k, v, heads))]
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        let (dtype, rows) = (q.dtype(), q.shape()[0]);
        let by_heads = |t| composed::by_heads::<Self>(t, rows, heads);
        let (q, k, v) = (by_heads(q), by_heads(k), by_heads(v));
        let o = Self::float_matmul(composed::probabilities::<Self>(q, k).0, v);
        cast::<Self>(composed::as_tokens::<Self>(o), dtype)
    }

    /// See [`attention_pull_back`]. The default composes burn's ops with every score of the
    /// call materialised; the GPU runs two kernels.
    #[fusion(dtype = q, shape = pull_back_shape(q, k, v, o, g, heads, keys))]
    fn attention_pull_back(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        g: FloatTensor<Self>,
        heads: usize,
        keys: bool,
    ) -> FloatTensor<Self> {
        let (dtype, rows) = (q.dtype(), g.shape()[0]);
        let by_heads = |t| composed::by_heads::<Self>(t, rows, heads);
        let transposed = |t: FloatTensor<Self>| Self::float_swap_dims(t, 2, 3);
        let (q, k, v, o, g) = (
            by_heads(q),
            by_heads(k),
            by_heads(v),
            by_heads(o),
            by_heads(g),
        );
        let (p, scale) = composed::probabilities::<Self>(q.clone(), k.clone());
        // dS = P ⊙ (dP − rowsum(dO ⊙ O)), the softmax Jacobian applied row by row.
        let delta = Self::float_sum_dim(Self::float_mul(g.clone(), o), 3);
        let dp = Self::float_matmul(g.clone(), transposed(v));
        let ds = Self::float_mul(p.clone(), Self::float_sub(dp, delta));
        let ds = Self::float_mul_scalar(ds, scale);
        let mut parts = vec![Self::float_matmul(ds.clone(), k)];
        if keys {
            parts.push(Self::float_matmul(transposed(ds), q));
            parts.push(Self::float_matmul(transposed(p), g));
        }
        let parts = parts
            .into_iter()
            .map(|t| {
                let tokens = composed::as_tokens::<Self>(t);
                let [rows, n, c] = tokens.shape().dims();
                Self::float_reshape(tokens, Shape::new([1, rows, n, c]))
            })
            .collect();
        cast::<Self>(Self::float_cat(parts, 0), dtype)
    }
}

/// The pieces the trait's default bodies share, in f32.
mod composed {
    use super::*;

    /// `t` `[b, n, heads · d]` as `[rows, heads, n, d]` in f32, its batch repeated to `rows`.
    pub(super) fn by_heads<B: Backend>(
        t: FloatTensor<B>,
        rows: usize,
        heads: usize,
    ) -> FloatTensor<B> {
        let shape = t.shape();
        let t = cast::<B>(t, DType::F32);
        let t = if shape[0] == rows {
            t
        } else {
            B::float_repeat_dim(t, 0, rows / shape[0])
        };
        let t = B::float_reshape(t, Shape::new([rows, shape[1], heads, shape[2] / heads]));
        B::float_swap_dims(t, 1, 2)
    }

    /// `[rows, heads, n, d]` back to tokens `[rows, n, heads · d]`.
    pub(super) fn as_tokens<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
        let [rows, heads, n, d] = t.shape().dims();
        B::float_reshape(
            B::float_swap_dims(t, 1, 2),
            Shape::new([rows, n, heads * d]),
        )
    }

    /// `softmax(q kᵀ · scale)` over the keys for `[rows, heads, n, d]` inputs, and the scale
    /// `1 / √d`.
    pub(super) fn probabilities<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
    ) -> (FloatTensor<B>, Scalar) {
        let scale = Scalar::from((q.shape()[3] as f64).powf(-0.5));
        let s = B::float_mul_scalar(B::float_matmul(q, B::float_swap_dims(k, 2, 3)), scale);
        let e = B::float_exp(B::float_sub(s.clone(), B::float_max_dim(s, 3)));
        (B::float_div(e.clone(), B::float_sum_dim(e, 3)), scale)
    }
}

#[cfg(not(target_family = "wasm"))]
impl FlashAttentionOps for burn::backend::Flex {}

impl<B: Backend + FlashAttentionOps, C: CheckpointStrategy> FlashAttentionOps for Autodiff<B, C> {}

/// Units per cube: each takes one query (or key) row of one head.
const UNITS: usize = 64;

/// Workgroup memory for one cube's tiles: WebGPU guarantees 16 KiB.
const TILE_BYTES: usize = 16 << 10;

/// Rows of the other side staged per step: two `[tile, d]` f32 tiles (`d` rounded up to whole
/// quads of four) plus two f32 per row (the key kernel's log-sum-exp and `rowsum(dO ⊙ O)`)
/// within [`TILE_BYTES`], a power of two, at most 64.
fn rows_per_tile(d: usize) -> usize {
    let fit = TILE_BYTES / (4 * (2 * 4 * d.div_ceil(4) + 2));
    (1usize << fit.max(1).ilog2()).min(64)
}

/// How the kernels launch for `rows` (cotangent or batch) rows of `heads` heads of width `d`:
/// a cube of [`UNITS`] units per block of rows of one (row, head), the tile's rows, the scale.
struct Launch {
    cube_dim: CubeDim,
    row_heads: usize,
    /// Quads of four features per head.
    quads: usize,
    tile: usize,
    scale: f32,
}

impl Launch {
    fn new(rows: usize, heads: usize, d: usize) -> Self {
        Self {
            cube_dim: CubeDim::new_1d(UNITS as u32),
            row_heads: rows * heads,
            quads: d.div_ceil(4),
            tile: rows_per_tile(d),
            scale: (d as f32).powf(-0.5),
        }
    }

    /// Cubes for `n` query (or key) rows per (row, head).
    fn grid(&self, n: usize) -> CubeCount {
        CubeCount::Static(n.div_ceil(UNITS) as u32, self.row_heads as u32, 1)
    }
}

impl FlashAttentionOps for CubeBackend {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        let [q, k, v] = [q, k, v].map(untile);
        let shape = forward_shape(q.meta.shape(), k.meta.shape(), v.meta.shape(), &heads);
        let (rows, nq, d) = (shape[0], shape[1], shape[2] / heads);
        let at = Launch::new(rows, heads, d);
        let output =
            empty_device_contiguous_dtype(q.client.clone(), q.device.clone(), shape, q.dtype);
        // SAFETY: every index the kernel forms is in bounds by construction: a unit's row is
        // clamped to the last one (`place`), staged reads past `n` are skipped, shared indices stay
        // under `tile · dim`, and only active units write. Unchecked, the inner loop's reads carry
        // no compare and select each (cubecl's checked launch adds them to every access).
        unsafe {
            kernel::forward_kernel::launch_unchecked(
                &q.client,
                at.grid(nq),
                at.cube_dim,
                q.clone().into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                heads,
                at.scale,
                d,
                at.quads,
                at.tile,
                UNITS,
                dtype_to_storage_type(q.dtype),
            );
        }
        output
    }

    fn attention_pull_back(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        g: FloatTensor<Self>,
        heads: usize,
        keys: bool,
    ) -> FloatTensor<Self> {
        let [q, k, v, o, g] = [q, k, v, o, g].map(untile);
        let (nq, c) = (q.meta.shape()[1], q.meta.shape()[2]);
        let (nk, rows) = (k.meta.shape()[1], g.meta.shape()[0]);
        let d = c / heads;
        let at = Launch::new(rows, heads, d);
        let (client, device) = (q.client.clone(), q.device.clone());
        let parts = if keys { 3 } else { 1 };
        let output = empty_device_contiguous_dtype(
            client.clone(),
            device.clone(),
            Shape::new([parts, rows, nq, c]),
            q.dtype,
        );
        // Per (row, head, query): the log-sum-exp of the scaled scores and rowsum(dO ⊙ O).
        let stats = empty_device_contiguous_dtype(
            client.clone(),
            device,
            Shape::new([rows * heads * nq, 2]),
            DType::F32,
        );
        let dtypes = [q.dtype, g.dtype].map(dtype_to_storage_type);
        // SAFETY: as in `flash_attention`; `stats` has a pair per (row, head, query).
        unsafe {
            kernel::query_pull_back_kernel::launch_unchecked(
                &client,
                at.grid(nq),
                at.cube_dim,
                q.clone().into_tensor_arg(),
                k.clone().into_tensor_arg(),
                v.clone().into_tensor_arg(),
                o.into_tensor_arg(),
                g.clone().into_tensor_arg(),
                output.clone().into_tensor_arg(),
                stats.clone().into_tensor_arg(),
                heads,
                at.scale,
                d,
                at.quads,
                at.tile,
                UNITS,
                dtypes,
            );
        }
        if keys {
            // SAFETY: as above; the key kernel's units index keys, clamped the same way.
            unsafe {
                kernel::key_pull_back_kernel::launch_unchecked(
                    &client,
                    at.grid(nk),
                    at.cube_dim,
                    q.into_tensor_arg(),
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    g.into_tensor_arg(),
                    stats.into_tensor_arg(),
                    output.clone().into_tensor_arg(),
                    heads,
                    at.scale,
                    d,
                    at.quads,
                    at.tile,
                    UNITS,
                    dtypes,
                );
            }
        }
        output
    }
}

mod kernel;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::AttentionPlan;
    use crate::model::pullback::{Kept, widen};
    use burn::tensor::Device;

    fn wave(shape: [usize; 3], seed: f32, device: &Device) -> Tensor<3> {
        crate::model::wave(shape, seed, [1.5, 0.0], device)
    }

    /// Multi-head attention of `[b, n, c]` tokens, whole, through burn's ops.
    fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
        let split = |t: Tensor<3>| {
            let [b, n, c] = t.dims();
            t.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
        };
        let plan = AttentionPlan {
            max_score_bytes: usize::MAX,
        };
        let o = plan.attend_chunked(split(q), split(k), split(v), false);
        let [b, h, n, d] = o.dims();
        o.swap_dims(1, 2).reshape([b, n, h * d])
    }

    /// The forward kernel, and the trait's default body (reached through autodiff-tracked
    /// inputs), against attention in score chunks in f32 on the same GPU and the same
    /// (rounded) inputs: keys off the tile and queries off the cube sizes, d = 8, 40 and 160,
    /// q, k, v slices of stacked products. Relative to the largest output. In f32 the sums
    /// differ in order and in the running softmax's rescalings, a few f32 steps: 1e-5. With f16
    /// inputs both compute in f32 and the kernel rounds its result once, by up to an f16 step
    /// (2^-10 of the value) more for the largest: 2e-3 allows two.
    #[test]
    fn forward_kernel_equals_chunks() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        // (batch, heads, queries, keys, d)
        // d = 6 pads each head's second quad of four features with zeros.
        let cases = [
            (2, 2, 70, 77, 8),
            (1, 3, 37, 37, 40),
            (1, 1, 20, 20, 160),
            (1, 3, 33, 21, 6),
        ];
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F16, 2e-3)] {
            for (b, heads, nq, nk, d) in cases {
                let c = heads * d;
                let q = wave([b, nq, 2 * c], 0.37, &device)
                    .cast(dtype)
                    .narrow(2, c, c);
                let context = wave([b, nk, 2 * c], 0.53, &device).cast(dtype);
                let (k, v) = (context.clone().narrow(2, 0, c), context.narrow(2, c, c));
                let f32_of = |t: &Tensor<3>| t.clone().cast(DType::F32);
                let want = attention(f32_of(&q), f32_of(&k), f32_of(&v), heads);
                let scale = want.clone().abs().max().into_scalar::<f32>();
                let ours = flash_attention(q.clone(), k.clone(), v.clone(), heads);
                let tracked = |t: &Tensor<3>| t.clone().autodiff();
                let composed = flash_attention(tracked(&q), tracked(&k), tracked(&v), heads)
                    .without_autodiff();
                for (name, got) in [("kernel", ours), ("composition", composed)] {
                    assert_eq!(got.dims(), [b, nq, c], "{name}");
                    assert_eq!(got.dtype(), dtype, "{name}");
                    let diff = (got.cast(DType::F32) - want.clone())
                        .abs()
                        .max()
                        .into_scalar::<f32>();
                    assert!(
                        diff <= tolerance * scale,
                        "{name} {dtype:?} b {b} heads {heads} {nq}x{nk} d {d}: differs by \
                         {diff} of {scale}"
                    );
                }
            }
        }
    }

    /// In f32, the kernels and the composition the trait's default body makes (reached
    /// through autodiff-tracked inputs) against autodiff of the forward, on the same GPU; with
    /// f16 inputs, the kernels against the composition.
    ///
    /// Cases: query and key counts that are not multiples of a cube's 64 units or of a tile's
    /// rows (d = 8: 64 rows per tile; d = 40: 32; d = 160: 8), a head width that is not a
    /// multiple of the kernels' quads of four (d = 6), two cotangent row groups against
    /// one kept batch, cross-attention (77 keys, no keys' gradients), and inputs as the UNet
    /// hands them: q, k and v slices of one stacked product and a transposed cotangent.
    /// Relative to the largest gradient of each part. In f32 both sides sum at most 77 terms
    /// in f32, in other orders: 1e-4 leaves room above the f32 rounding of such sums. In f16
    /// autodiff is no reference: it recomputes the output `o` in f32, while a pull-back takes
    /// the kept f16 `o`, whose rounding `rowsum(dO ⊙ O)` carries into `dP − rowsum(dO ⊙ O)`,
    /// a difference of like terms. The kernels and the composition take the same `o` and
    /// compute in f32, each rounding its result once, so they may land an f16 step apart
    /// (2^-10 of the value) or two: 2e-3.
    #[test]
    fn kernels_equal_autodiff() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        // (batch, heads, queries, keys, d, cotangent rows, keys' gradients)
        let cases = [
            (1, 2, 70, 70, 8, 2, true),
            (2, 3, 37, 37, 40, 2, true),
            (1, 2, 70, 77, 8, 2, false),
            (1, 1, 20, 20, 160, 1, true),
            (1, 3, 33, 33, 6, 2, true),
        ];
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::F16, 2e-3)] {
            for (b, heads, nq, nk, d, rows, keys) in cases {
                let c = heads * d;
                let stacked = wave([b, nq, 3 * c], 0.37, &device).cast(dtype);
                let q = stacked.clone().narrow(2, 0, c);
                let (k, v) = if keys {
                    (stacked.clone().narrow(2, c, c), stacked.narrow(2, 2 * c, c))
                } else {
                    let context = wave([b, nk, 2 * c], 0.53, &device).cast(dtype);
                    (context.clone().narrow(2, 0, c), context.narrow(2, c, c))
                };
                let o = attention(q.clone(), k.clone(), v.clone(), heads);
                let g = wave([rows, c, nq], 0.71, &device)
                    .swap_dims(1, 2)
                    .cast(dtype);

                let f32_of = |t: &Tensor<3>| widen(t, rows).cast(DType::F32);
                let mut want: Vec<Tensor<3>> =
                    Kept::run([&f32_of(&q), &f32_of(&k), &f32_of(&v)], |[q, k, v]| {
                        attention(q, k, v, heads)
                    })
                    .pull_back(g.clone().cast(DType::F32))
                    .to_vec();

                let ours = attention_pull_back(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    o.clone(),
                    g.clone(),
                    heads,
                    keys,
                );
                let tracked = |t: &Tensor<3>| t.clone().autodiff();
                let composed = attention_pull_back(
                    tracked(&q),
                    tracked(&k),
                    tracked(&v),
                    tracked(&o),
                    tracked(&g),
                    heads,
                    keys,
                )
                .without_autodiff();
                let parts = if keys { 3 } else { 1 };
                let checks = if dtype == DType::F32 {
                    vec![("kernels", ours), ("composition", composed)]
                } else {
                    let parts = (0..parts).map(|p| {
                        let part = composed.clone().narrow(0, p, 1).reshape([rows, nq, c]);
                        part.cast(DType::F32)
                    });
                    want = parts.collect();
                    vec![("kernels", ours)]
                };
                for (name, got) in checks {
                    assert_eq!(got.dims(), [parts, rows, nq, c], "{name}");
                    assert_eq!(got.dtype(), dtype, "{name}");
                    for (part, want) in want.iter().take(parts).enumerate() {
                        let got = got.clone().narrow(0, part, 1).reshape([rows, nq, c]);
                        let scale = want.clone().abs().max().into_scalar::<f32>();
                        let diff = (got.cast(DType::F32) - want.clone())
                            .abs()
                            .max()
                            .into_scalar::<f32>();
                        assert!(
                            diff <= tolerance * scale,
                            "{name} {dtype:?} b {b} heads {heads} {nq}x{nk} d {d} rows {rows} \
                             part {part}: differs by {diff} of {scale}"
                        );
                    }
                }
            }
        }
    }
}
