//! The pull-back of multi-head attention, `softmax(q kᵀ / √d) v`, as two kernels of our own
//! that never write a score: the recomputation-based backward of FlashAttention (Dao, 2023).
//!
//! Composed of burn's ops (what [`AttentionPlan::attend_pullback`] does) a 64x64
//! self-attention's pull-back materialises a 4096x4096 score chunk per head, its softmax and
//! two more chunks of the same size, in about ten launches per chunk, around copies that lay
//! the tokens out by heads and back. Here one kernel walks the keys for each query, keeping the
//! softmax's running maximum and sum (so it needs no first pass for them), and writes the
//! queries' gradient and each query's log-sum-exp; a second walks the queries for each key and
//! writes the keys' and values' gradients. Both read `[b, n, heads · d]` tokens where they
//! stand (strided views included) and stage a tile of the other side's rows in workgroup
//! memory, sized under WebGPU's guaranteed 16 KiB.
//!
//! The composition stays for burn's CPU backend and for tensors that autodiff tracks; on those
//! the caller keeps using the chunked pull-back, which bounds its memory.
//!
//! [`AttentionPlan::attend_pullback`]: crate::model::attention::AttentionPlan::attend_pullback

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

/// Whether [`attention_pull_back`] runs as the kernels on `device`: a cubecl GPU, not autodiff
/// (where the composition would hold every score at once).
pub fn runs_as_kernels(device: &burn::tensor::Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
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

#[backend_extension(Cube, Fusion, Flex: cfg(not(target_family = "wasm")), Autodiff)]
pub trait AttentionPullBackOps: Backend {
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
        let dtype = q.dtype();
        let rows = g.shape()[0];
        let d = q.shape()[2] / heads;
        // [rows, heads, n, d] in f32, the kept tensors' batch repeated to the cotangent's rows.
        let by_heads = |t: FloatTensor<Self>| {
            let shape = t.shape();
            let t = cast::<Self>(t, DType::F32);
            let t = if shape[0] == rows {
                t
            } else {
                Self::float_repeat_dim(t, 0, rows / shape[0])
            };
            let t = Self::float_reshape(t, Shape::new([rows, shape[1], heads, d]));
            Self::float_swap_dims(t, 1, 2)
        };
        let transposed = |t: FloatTensor<Self>| Self::float_swap_dims(t, 2, 3);
        let (q, k, v, o, g) = (
            by_heads(q),
            by_heads(k),
            by_heads(v),
            by_heads(o),
            by_heads(g),
        );
        let scale = Scalar::from((d as f64).powf(-0.5));
        let s = Self::float_mul_scalar(Self::float_matmul(q.clone(), transposed(k.clone())), scale);
        let e = Self::float_exp(Self::float_sub(s.clone(), Self::float_max_dim(s, 3)));
        let p = Self::float_div(e.clone(), Self::float_sum_dim(e, 3));
        // dS = P ⊙ (dP − rowsum(dO ⊙ O)), the softmax Jacobian applied row by row.
        let delta = Self::float_sum_dim(Self::float_mul(g.clone(), o), 3);
        let dp = Self::float_matmul(g.clone(), transposed(v));
        let ds = Self::float_mul_scalar(
            Self::float_mul(p.clone(), Self::float_sub(dp, delta)),
            scale,
        );
        let mut parts = vec![Self::float_matmul(ds.clone(), k)];
        if keys {
            parts.push(Self::float_matmul(transposed(ds), q));
            parts.push(Self::float_matmul(transposed(p), g));
        }
        let parts = parts
            .into_iter()
            .map(|t| {
                let [_, _, n, _] = t.shape().dims();
                let tokens = Self::float_swap_dims(t, 1, 2);
                Self::float_reshape(tokens, Shape::new([1, rows, n, heads * d]))
            })
            .collect();
        cast::<Self>(Self::float_cat(parts, 0), dtype)
    }
}

#[cfg(not(target_family = "wasm"))]
impl AttentionPullBackOps for burn::backend::Flex {}

impl<B: Backend + AttentionPullBackOps, C: CheckpointStrategy> AttentionPullBackOps
    for Autodiff<B, C>
{
}

/// Units per cube: each takes one query (or key) row of one head.
const UNITS: usize = 64;

/// Workgroup memory for one cube's tiles: WebGPU guarantees 16 KiB.
const TILE_BYTES: usize = 16 << 10;

/// Rows of the other side staged per step: two `[tile, d]` f32 tiles plus two f32 per row
/// (the key kernel's log-sum-exp and `rowsum(dO ⊙ O)`) within [`TILE_BYTES`], a power of two,
/// at most 64.
fn rows_per_tile(d: usize) -> usize {
    let fit = TILE_BYTES / (4 * (2 * d + 2));
    (1usize << fit.max(1).ilog2()).min(64)
}

impl AttentionPullBackOps for CubeBackend {
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
        let tile = rows_per_tile(d);
        let scale = (d as f32).powf(-0.5);
        let cube_dim = CubeDim::new_1d(UNITS as u32);
        let grid = |n: usize| CubeCount::Static(n.div_ceil(UNITS) as u32, (rows * heads) as u32, 1);
        let dtypes = [q.dtype, g.dtype].map(dtype_to_storage_type);
        kernel::query_pull_back_kernel::launch(
            &client,
            grid(nq),
            cube_dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            o.into_tensor_arg(),
            g.clone().into_tensor_arg(),
            output.clone().into_tensor_arg(),
            stats.clone().into_tensor_arg(),
            heads,
            scale,
            d,
            tile,
            UNITS,
            dtypes,
        );
        if keys {
            kernel::key_pull_back_kernel::launch(
                &client,
                grid(nk),
                cube_dim,
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                g.into_tensor_arg(),
                stats.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                heads,
                scale,
                d,
                tile,
                UNITS,
                dtypes,
            );
        }
        output
    }
}

mod kernel {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Which row of which head a unit takes: cubes run along `x` over blocks of `units` rows
    /// and along `y` over (cotangent row, head) pairs. `index` is clamped to the last row so
    /// that a unit past it (which still stages tiles and meets the barriers) reads in bounds.
    #[derive(CubeType)]
    struct Place {
        row: usize,
        batch: usize,
        first: usize,
        row_head: usize,
        index: usize,
        active: bool,
    }

    #[cube]
    fn place(
        n: usize,
        kept_batch: usize,
        heads: usize,
        #[comptime] units: usize,
        #[comptime] dim: usize,
    ) -> Place {
        let row_head = CUBE_POS_Y as usize;
        let row = row_head / heads;
        let wanted = CUBE_POS_X as usize * units + UNIT_POS as usize;
        let mut index = wanted;
        if wanted >= n {
            index = n - 1;
        }
        Place {
            row,
            batch: row % kept_batch,
            first: (row_head % heads) * dim,
            row_head,
            index,
            active: wanted < n,
        }
    }

    /// The index of token `i`, feature `first + c`, of batch item `batch` in `t` `[b, n, c]`.
    #[cube]
    fn at<T: CubePrimitive>(t: &Tensor<T>, batch: usize, i: usize, feature: usize) -> usize {
        batch * t.stride(0) + i * t.stride(1) + feature * t.stride(2)
    }

    /// Token `i`'s `dim` features from `first`, in f32, times `factor`.
    #[cube]
    fn load_row<T: Float>(
        t: &Tensor<T>,
        batch: usize,
        i: usize,
        first: usize,
        factor: f32,
        #[comptime] dim: usize,
    ) -> Array<f32> {
        let mut row = Array::<f32>::new(dim);
        for c in 0..dim {
            row[c] = f32::cast_from(t[at(t, batch, i, first + c)]) * factor;
        }
        row
    }

    /// Stages tokens `start..start + tile` (zeros past `n`), features `first..first + dim`, of
    /// batch item `batch` of `t` in `staged` `[tile, dim]`, the cube's units sharing the reads.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn stage<T: Float>(
        t: &Tensor<T>,
        batch: usize,
        first: usize,
        start: usize,
        n: usize,
        staged: &mut Shared<[f32]>,
        #[comptime] dim: usize,
        #[comptime] tile: usize,
        #[comptime] units: usize,
    ) {
        let mut e = UNIT_POS as usize;
        while e < tile * dim {
            let i = start + e / dim;
            let mut value = f32::new(0.0);
            if i < n {
                value = f32::cast_from(t[at(t, batch, i, first + e % dim)]);
            }
            staged[e] = value;
            e += units;
        }
    }

    /// The dot product of `row` with staged row `j`.
    #[cube]
    fn dot(row: &Array<f32>, staged: &Shared<[f32]>, j: usize, #[comptime] dim: usize) -> f32 {
        let mut sum = f32::new(0.0);
        for c in 0..dim {
            sum += row[c] * staged[j * dim + c];
        }
        sum
    }

    /// One unit per (cotangent row, head, query): `dq = scale · Σⱼ pⱼ (dpⱼ − δ) kⱼ`, with
    /// `pⱼ = softmax(scale · q kᵀ)ⱼ`, `dpⱼ = g · vⱼ` and `δ = g · o`. The softmax's maximum `m`
    /// and sum `l` run along the keys: when a larger score comes, what was summed is rescaled
    /// by `exp(m_old − m_new)`, so `p` needs no earlier pass. Writes `dq` as part 0 of
    /// `output` `[parts, rows, nq, c]`, and the log-sum-exp `m + ln l` and `δ` to `stats`
    /// for the key kernel.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn query_pull_back_kernel<E: Float, G: Float>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        o: &Tensor<E>,
        g: &Tensor<G>,
        output: &mut Tensor<E>,
        stats: &mut Tensor<f32>,
        heads: usize,
        scale: f32,
        #[comptime] dim: usize,
        #[comptime] tile: usize,
        #[comptime] units: usize,
        #[define(E, G)] _dtypes: [ElemType; 2],
    ) {
        let nq = q.shape(1);
        let nk = k.shape(1);
        let at_ = place(nq, q.shape(0), heads, units, dim);
        let query = load_row(q, at_.batch, at_.index, at_.first, scale, dim);
        let cotangent = load_row(g, at_.row, at_.index, at_.first, f32::new(1.0), dim);
        let out = load_row(o, at_.batch, at_.index, at_.first, f32::new(1.0), dim);
        let mut delta = f32::new(0.0);
        for c in 0..dim {
            delta += cotangent[c] * out[c];
        }
        let mut acc = Array::<f32>::new(dim);
        for c in 0..dim {
            acc[c] = f32::new(0.0);
        }
        // Finite, so that the first rescaling is exp of a large negative number: 0.
        let mut max = f32::new(-1.0e30);
        let mut sum = f32::new(0.0);

        let mut staged_k = Shared::<[f32]>::new_slice(tile * dim);
        let mut staged_v = Shared::<[f32]>::new_slice(tile * dim);
        let mut start = 0usize;
        while start < nk {
            stage(
                k,
                at_.batch,
                at_.first,
                start,
                nk,
                &mut staged_k,
                dim,
                tile,
                units,
            );
            stage(
                v,
                at_.batch,
                at_.first,
                start,
                nk,
                &mut staged_v,
                dim,
                tile,
                units,
            );
            sync_cube();
            let mut count = nk - start;
            if count > tile {
                count = tile;
            }
            if at_.active {
                for j in 0..count {
                    let s = dot(&query, &staged_k, j, dim);
                    let dp = dot(&cotangent, &staged_v, j, dim);
                    if s > max {
                        let rescale = f32::exp(max - s);
                        sum *= rescale;
                        for c in 0..dim {
                            acc[c] *= rescale;
                        }
                        max = s;
                    }
                    let p = f32::exp(s - max);
                    sum += p;
                    let weight = p * (dp - delta);
                    for c in 0..dim {
                        acc[c] += weight * staged_k[j * dim + c];
                    }
                }
            }
            // Nobody stages the next tile before everyone has read this one.
            sync_cube();
            start += tile;
        }

        if at_.active {
            let width = output.shape(3);
            let base = (at_.row * nq + at_.index) * width + at_.first;
            let factor = scale / sum;
            for c in 0..dim {
                output[base + c] = E::cast_from(acc[c] * factor);
            }
            let s = (at_.row_head * nq + at_.index) * 2;
            stats[s] = max + f32::ln(sum);
            stats[s + 1] = delta;
        }
    }

    /// One unit per (cotangent row, head, key): `dk = scale · Σᵢ dsᵢ qᵢ` and `dv = Σᵢ pᵢ gᵢ`
    /// over the queries `i`, with `pᵢ = exp(scale · qᵢ · k − lseᵢ)`, `dsᵢ = pᵢ (gᵢ · v − δᵢ)`,
    /// and `lseᵢ`, `δᵢ` from the query kernel's `stats`. Writes parts 1 and 2 of `output`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn key_pull_back_kernel<E: Float, G: Float>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        g: &Tensor<G>,
        stats: &Tensor<f32>,
        output: &mut Tensor<E>,
        heads: usize,
        scale: f32,
        #[comptime] dim: usize,
        #[comptime] tile: usize,
        #[comptime] units: usize,
        #[define(E, G)] _dtypes: [ElemType; 2],
    ) {
        let nq = q.shape(1);
        let nk = k.shape(1);
        let at_ = place(nk, q.shape(0), heads, units, dim);
        let key = load_row(k, at_.batch, at_.index, at_.first, scale, dim);
        let value = load_row(v, at_.batch, at_.index, at_.first, f32::new(1.0), dim);
        let mut dk = Array::<f32>::new(dim);
        let mut dv = Array::<f32>::new(dim);
        for c in 0..dim {
            dk[c] = f32::new(0.0);
            dv[c] = f32::new(0.0);
        }

        let mut staged_q = Shared::<[f32]>::new_slice(tile * dim);
        let mut staged_g = Shared::<[f32]>::new_slice(tile * dim);
        let mut staged_stats = Shared::<[f32]>::new_slice(tile * 2);
        let mut start = 0usize;
        while start < nq {
            stage(
                q,
                at_.batch,
                at_.first,
                start,
                nq,
                &mut staged_q,
                dim,
                tile,
                units,
            );
            stage(
                g,
                at_.row,
                at_.first,
                start,
                nq,
                &mut staged_g,
                dim,
                tile,
                units,
            );
            let mut e = UNIT_POS as usize;
            while e < tile * 2 {
                let i = start + e / 2;
                let mut value = f32::new(0.0);
                if i < nq {
                    value = stats[(at_.row_head * nq + i) * 2 + e % 2];
                }
                staged_stats[e] = value;
                e += units;
            }
            sync_cube();
            let mut count = nq - start;
            if count > tile {
                count = tile;
            }
            if at_.active {
                for i in 0..count {
                    let s = dot(&key, &staged_q, i, dim);
                    let dp = dot(&value, &staged_g, i, dim);
                    let p = f32::exp(s - staged_stats[i * 2]);
                    let ds = p * (dp - staged_stats[i * 2 + 1]);
                    for c in 0..dim {
                        dv[c] += p * staged_g[i * dim + c];
                        dk[c] += ds * staged_q[i * dim + c];
                    }
                }
            }
            sync_cube();
            start += tile;
        }

        if at_.active {
            let (rows, width) = (output.shape(1), output.shape(3));
            let dk_at = ((rows + at_.row) * nq + at_.index) * width + at_.first;
            let dv_at = ((2 * rows + at_.row) * nq + at_.index) * width + at_.first;
            for c in 0..dim {
                output[dk_at + c] = E::cast_from(dk[c] * scale);
                output[dv_at + c] = E::cast_from(dv[c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::AttentionPlan;
    use crate::model::pullback::{Kept, widen};
    use burn::tensor::Device;

    fn wave(shape: [usize; 3], seed: f32, device: &Device) -> Tensor<3> {
        let n: usize = shape.iter().product();
        Tensor::<1, burn::tensor::Int>::arange(0..n as i64, device)
            .float()
            .mul_scalar(seed)
            .sin()
            .mul_scalar(1.5)
            .reshape(shape)
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

    /// In f32, the kernels and the composition the trait's default body makes (reached
    /// through autodiff-tracked inputs) against autodiff of the forward, on the same GPU; with
    /// f16 inputs, the kernels against the composition.
    ///
    /// Cases: query and key counts that are not multiples of a cube's 64 units or of a tile's
    /// rows (d = 8: 64 rows per tile; d = 40: 32; d = 160: 8), two cotangent row groups against
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
