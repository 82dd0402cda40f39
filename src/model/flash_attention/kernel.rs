//! The attention kernels themselves, in cubecl: the forward, the queries' pull-back and the
//! keys' and values' pull-back, with the helpers they share.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// Four features side by side, the unit of the kernels' arithmetic and of their workgroup
/// reads: one read feeds four multiply-adds, where a GPU issues fewer workgroup-memory reads
/// per cycle than multiply-adds. A head's last quad is padded with zeros when its width is
/// not a multiple of four (SD 1.5's are).
type Quad = Vector<f32, Const<4>>;

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

/// Feature `c` of a head of `dim` (0 past it) whose first feature is at `base` in `t`,
/// features `step` apart, in f32.
#[cube]
fn feature<T: Float>(
    t: &Tensor<T>,
    base: usize,
    step: usize,
    c: usize,
    #[comptime] dim: usize,
) -> f32 {
    let mut value = f32::new(0.0);
    if c < dim {
        value = f32::cast_from(t[base + c * step]);
    }
    value
}

/// Features `4 l .. 4 l + 4` of the head from `first` of token `i` of batch item `batch`
/// in `t` `[b, n, c]`.
#[cube]
fn read_quad<T: Float>(
    t: &Tensor<T>,
    batch: usize,
    i: usize,
    first: usize,
    l: usize,
    #[comptime] dim: usize,
) -> Quad {
    let step = t.stride(2);
    let base = batch * t.stride(0) + i * t.stride(1) + first * step;
    let c = l * 4;
    let mut quad = Quad::new(f32::new(0.0));
    quad.insert(0usize, feature(t, base, step, c, dim));
    quad.insert(1usize, feature(t, base, step, c + 1, dim));
    quad.insert(2usize, feature(t, base, step, c + 2, dim));
    quad.insert(3usize, feature(t, base, step, c + 3, dim));
    quad
}

/// Token `i`'s head from `first`, in f32 quads, times `factor`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_row<T: Float>(
    t: &Tensor<T>,
    batch: usize,
    i: usize,
    first: usize,
    factor: f32,
    #[comptime] dim: usize,
    #[comptime] quads: usize,
) -> Array<Quad> {
    let mut row = Array::<Quad>::new(quads);
    #[unroll]
    for l in 0..quads {
        row[l] = read_quad(t, batch, i, first, l, dim) * Quad::new(factor);
    }
    row
}

/// Zeroed quads for a head.
#[cube]
fn zeros(#[comptime] quads: usize) -> Array<Quad> {
    let mut row = Array::<Quad>::new(quads);
    #[unroll]
    for l in 0..quads {
        row[l] = Quad::new(f32::new(0.0));
    }
    row
}

/// Stages tokens `start..start + tile` (zeros past `n`), the head from `first`, of batch
/// item `batch` of `t` in `staged` `[tile, quads]`, the cube's units sharing the reads.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage<T: Float>(
    t: &Tensor<T>,
    batch: usize,
    first: usize,
    start: usize,
    n: usize,
    staged: &mut Shared<[Quad]>,
    #[comptime] dim: usize,
    #[comptime] quads: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
) {
    let mut e = UNIT_POS as usize;
    while e < tile * quads {
        let i = start + e / quads;
        let mut value = Quad::new(f32::new(0.0));
        if i < n {
            value = read_quad(t, batch, i, first, e % quads, dim);
        }
        staged[e] = value;
        e += units;
    }
}

/// How many of the `tile` rows staged from `start` are real, of `n`.
#[cube]
fn rows_in_tile(n: usize, start: usize, #[comptime] tile: usize) -> usize {
    let mut count = n - start;
    if count > tile {
        count = tile;
    }
    count
}

/// The sum of a quad's four lanes.
#[cube]
fn lanes_sum(quad: Quad) -> f32 {
    quad.extract(0usize) + quad.extract(1usize) + quad.extract(2usize) + quad.extract(3usize)
}

/// The dot product of `row` with staged row `j`.
#[cube]
fn dot(row: &Array<Quad>, staged: &Shared<[Quad]>, j: usize, #[comptime] quads: usize) -> f32 {
    let mut sum = Quad::new(f32::new(0.0));
    #[unroll]
    for l in 0..quads {
        sum += row[l] * staged[j * quads + l];
    }
    lanes_sum(sum)
}

/// `acc += weight · staged row j`.
#[cube]
fn add_scaled(
    acc: &mut Array<Quad>,
    weight: f32,
    staged: &Shared<[Quad]>,
    j: usize,
    #[comptime] quads: usize,
) {
    let weight = Quad::new(weight);
    #[unroll]
    for l in 0..quads {
        acc[l] += weight * staged[j * quads + l];
    }
}

/// Writes `row · factor`, the head's `dim` features, to `t` from flat index `base`.
#[cube]
fn write_row<T: Float>(
    t: &mut Tensor<T>,
    base: usize,
    row: &Array<Quad>,
    factor: f32,
    #[comptime] dim: usize,
    #[comptime] quads: usize,
) {
    #[unroll]
    for l in 0..quads {
        let quad = row[l] * Quad::new(factor);
        let c = l * 4;
        t[base + c] = T::cast_from(quad.extract(0usize));
        if c + 1 < dim {
            t[base + c + 1] = T::cast_from(quad.extract(1usize));
        }
        if c + 2 < dim {
            t[base + c + 2] = T::cast_from(quad.extract(2usize));
        }
        if c + 3 < dim {
            t[base + c + 3] = T::cast_from(quad.extract(3usize));
        }
    }
}

/// What a unit's walk over the keys leaves: the largest scaled score `max`, `sum =
/// Σⱼ exp(sⱼ − max)`, and `acc = Σⱼ exp(sⱼ − max) · xⱼ`, with `xⱼ = vⱼ` (the forward) or,
/// with `pull_back`, `xⱼ = (g · vⱼ − δ) kⱼ` (the queries' gradient).
#[derive(CubeType)]
struct Walk {
    max: f32,
    sum: f32,
    acc: Array<Quad>,
}

/// Walks the keys and values of the unit's (batch item, head) a tile at a time, the cube
/// staging each tile in workgroup memory, for the unit's `query` (already scaled). The
/// softmax's maximum and sum run along: when a larger score comes, what was summed is
/// rescaled by `exp(max_old − max_new)`, so one pass is enough. Every unit, active or not,
/// meets the barriers; the loop's bound is the same for the whole cube.
#[cube]
#[allow(clippy::too_many_arguments)]
fn walk_keys<E: Float>(
    k: &Tensor<E>,
    v: &Tensor<E>,
    at_: &Place,
    query: &Array<Quad>,
    cotangent: &Array<Quad>,
    delta: f32,
    #[comptime] dim: usize,
    #[comptime] quads: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[comptime] pull_back: bool,
) -> Walk {
    let nk = k.shape(1);
    let mut acc = zeros(quads);
    // Finite, so that the first rescaling is exp of a large negative number: 0.
    let mut max = f32::new(-1.0e30);
    let mut sum = f32::new(0.0);
    let mut staged_k = Shared::<[Quad]>::new_slice(tile * quads);
    let mut staged_v = Shared::<[Quad]>::new_slice(tile * quads);
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
            quads,
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
            quads,
            tile,
            units,
        );
        sync_cube();
        let count = rows_in_tile(nk, start, tile);
        if at_.active {
            for j in 0..count {
                let s = dot(query, &staged_k, j, quads);
                if s > max {
                    let rescale = f32::exp(max - s);
                    sum *= rescale;
                    let by = Quad::new(rescale);
                    #[unroll]
                    for l in 0..quads {
                        acc[l] *= by;
                    }
                    max = s;
                }
                let p = f32::exp(s - max);
                sum += p;
                if pull_back {
                    let weight = p * (dot(cotangent, &staged_v, j, quads) - delta);
                    add_scaled(&mut acc, weight, &staged_k, j, quads);
                } else {
                    add_scaled(&mut acc, p, &staged_v, j, quads);
                }
            }
        }
        // Nobody stages the next tile before everyone has read this one.
        sync_cube();
        start += tile;
    }
    Walk { max, sum, acc }
}

/// One unit per (batch item, head, query): `o = Σⱼ pⱼ vⱼ` with `pⱼ = softmax(scale · q
/// kᵀ)ⱼ`, `acc / sum` of [`walk_keys`]. Writes `output` `[b, nq, c]`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_kernel<E: Float>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    output: &mut Tensor<E>,
    heads: usize,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] quads: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[define(E)] _dtype: ElemType,
) {
    let nq = q.shape(1);
    let at_ = place(nq, q.shape(0), heads, units, dim);
    let query = load_row(q, at_.batch, at_.index, at_.first, scale, dim, quads);
    // Not read: the walk without `pull_back` takes no cotangent.
    let unused = Array::<Quad>::new(1usize);
    let walk = walk_keys(
        k,
        v,
        &at_,
        &query,
        &unused,
        f32::new(0.0),
        dim,
        quads,
        tile,
        units,
        false,
    );
    if at_.active {
        let base = (at_.batch * nq + at_.index) * output.shape(2) + at_.first;
        write_row(
            output,
            base,
            &walk.acc,
            f32::new(1.0) / walk.sum,
            dim,
            quads,
        );
    }
}

/// One unit per (cotangent row, head, query): `dq = scale · Σⱼ pⱼ (dpⱼ − δ) kⱼ`, with
/// `pⱼ = softmax(scale · q kᵀ)ⱼ`, `dpⱼ = g · vⱼ` and `δ = g · o`: `scale · acc / sum` of
/// [`walk_keys`]. Writes `dq` as part 0 of `output` `[parts, rows, nq, c]`, and the
/// log-sum-exp `max + ln sum` and `δ` to `stats` for the key kernel.
#[cube(launch_unchecked)]
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
    #[comptime] quads: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[define(E, G)] _dtypes: [ElemType; 2],
) {
    let nq = q.shape(1);
    let at_ = place(nq, q.shape(0), heads, units, dim);
    let one = f32::new(1.0);
    let query = load_row(q, at_.batch, at_.index, at_.first, scale, dim, quads);
    let cotangent = load_row(g, at_.row, at_.index, at_.first, one, dim, quads);
    let out = load_row(o, at_.batch, at_.index, at_.first, one, dim, quads);
    let mut products = Quad::new(f32::new(0.0));
    #[unroll]
    for l in 0..quads {
        products += cotangent[l] * out[l];
    }
    let delta = lanes_sum(products);
    let walk = walk_keys(
        k, v, &at_, &query, &cotangent, delta, dim, quads, tile, units, true,
    );
    if at_.active {
        let width = output.shape(3);
        let base = (at_.row * nq + at_.index) * width + at_.first;
        write_row(output, base, &walk.acc, scale / walk.sum, dim, quads);
        let s = (at_.row_head * nq + at_.index) * 2;
        stats[s] = walk.max + f32::ln(walk.sum);
        stats[s + 1] = delta;
    }
}

/// One unit per (cotangent row, head, key): `dk = scale · Σᵢ dsᵢ qᵢ` and `dv = Σᵢ pᵢ gᵢ`
/// over the queries `i`, with `pᵢ = exp(scale · qᵢ · k − lseᵢ)`, `dsᵢ = pᵢ (gᵢ · v − δᵢ)`,
/// and `lseᵢ`, `δᵢ` from the query kernel's `stats`. Writes parts 1 and 2 of `output`.
#[cube(launch_unchecked)]
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
    #[comptime] quads: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[define(E, G)] _dtypes: [ElemType; 2],
) {
    let nq = q.shape(1);
    let nk = k.shape(1);
    let at_ = place(nk, q.shape(0), heads, units, dim);
    let key = load_row(k, at_.batch, at_.index, at_.first, scale, dim, quads);
    let value = load_row(
        v,
        at_.batch,
        at_.index,
        at_.first,
        f32::new(1.0),
        dim,
        quads,
    );
    let mut dk = zeros(quads);
    let mut dv = zeros(quads);

    let mut staged_q = Shared::<[Quad]>::new_slice(tile * quads);
    let mut staged_g = Shared::<[Quad]>::new_slice(tile * quads);
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
            quads,
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
            quads,
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
        let count = rows_in_tile(nq, start, tile);
        if at_.active {
            for i in 0..count {
                let s = dot(&key, &staged_q, i, quads);
                let dp = dot(&value, &staged_g, i, quads);
                let p = f32::exp(s - staged_stats[i * 2]);
                let ds = p * (dp - staged_stats[i * 2 + 1]);
                add_scaled(&mut dv, p, &staged_g, i, quads);
                add_scaled(&mut dk, ds, &staged_q, i, quads);
            }
        }
        sync_cube();
        start += tile;
    }

    if at_.active {
        let (rows, width) = (output.shape(1), output.shape(3));
        let dk_at = ((rows + at_.row) * nq + at_.index) * width + at_.first;
        let dv_at = ((2 * rows + at_.row) * nq + at_.index) * width + at_.first;
        write_row(output, dk_at, &dk, scale, dim, quads);
        write_row(output, dv_at, &dv, f32::new(1.0), dim, quads);
    }
}
