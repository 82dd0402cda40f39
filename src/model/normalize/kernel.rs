//! The norm kernels themselves, in cubecl: the forward and its closed-form pull-back.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// The sum of every unit's `value`, on every unit. Each barrier is reached by the whole
/// cube (the loop's bound is a compile-time constant), as WGSL requires.
#[cube]
fn cube_sum(partial: &mut Shared<[f32]>, value: f32, #[comptime] units: usize) -> f32 {
    let unit = UNIT_POS as usize;
    partial[unit] = value;
    sync_cube();
    let mut active = units.runtime();
    while active > 1 {
        active /= 2;
        if unit < active {
            partial[unit] += partial[unit + active];
        }
        sync_cube();
    }
    let total = partial[0];
    // Nobody writes `partial` for the next sum before everyone has read this one.
    sync_cube();
    total
}

/// Where one normalised row lies: row element `i` is
/// `t[batch, first + i / n, i % n]` of a `[b, m, n]` tensor `t`, for `count` elements
/// (zero in a cube past the last row, which still takes part in the barriers).
#[derive(CubeType)]
struct Row {
    batch: usize,
    first: usize,
    n: usize,
    count: usize,
    len: usize,
}

#[cube]
fn row_of(row: usize, rows: usize, groups: usize, m: usize, n: usize) -> Row {
    let span = m / groups;
    let len = span * n;
    let mut count = len;
    if row >= rows {
        count = 0;
    }
    Row {
        batch: row / groups,
        first: (row % groups) * span,
        n,
        count,
        len,
    }
}

/// The index in `t` of row element `i`, `batch` given separately (the input's batch may
/// be the cotangent's modulo its own).
#[cube]
fn at<T: CubePrimitive>(t: &Tensor<T>, batch: usize, row: &Row, i: usize) -> usize {
    batch * t.stride(0) + (row.first + i / row.n) * t.stride(1) + (i % row.n) * t.stride(2)
}

/// The channel of row element `i`: its middle index, or with `last` its last.
#[cube]
fn channel(row: &Row, i: usize, #[comptime] last: bool) -> usize {
    let mut c = row.first + i / row.n;
    if last {
        c = i % row.n;
    }
    c
}

/// The row's mean.
#[cube]
fn row_mean<E: Float>(
    input: &Tensor<E>,
    batch: usize,
    row: &Row,
    partial: &mut Shared<[f32]>,
    #[comptime] units: usize,
) -> f32 {
    let mut sum = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < row.count {
        sum += f32::cast_from(input[at(input, batch, row, i)]);
        i += units;
    }
    cube_sum(partial, sum, units) / f32::cast_from(row.len)
}

/// `1 / sqrt(variance + eps)`, the variance taken about the row's `mean` in a second
/// read rather than from the mean square: the difference of two large sums loses the
/// variance of a row far from zero.
#[cube]
fn row_rstd<E: Float>(
    input: &Tensor<E>,
    batch: usize,
    row: &Row,
    mean: f32,
    eps: f32,
    partial: &mut Shared<[f32]>,
    #[comptime] units: usize,
) -> f32 {
    let mut squares = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < row.count {
        let d = f32::cast_from(input[at(input, batch, row, i)]) - mean;
        squares += d * d;
        i += units;
    }
    let var = cube_sum(partial, squares, units) / f32::cast_from(row.len);
    f32::new(1.0) / f32::sqrt(var + eps)
}

/// Row element `i` of `input` normalised, `x̂ = (x − mean) · rstd`.
#[cube]
fn normalized_at<E: Float>(
    input: &Tensor<E>,
    batch: usize,
    row: &Row,
    i: usize,
    mean: f32,
    rstd: f32,
) -> f32 {
    (f32::cast_from(input[at(input, batch, row, i)]) - mean) * rstd
}

/// One cube per row `(batch, group)` of `input` `[b, m, n]` (see `Row`); the scale and
/// shift are per channel.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_kernel<E: Float, P: Float>(
    input: &Tensor<E>,
    gamma: &Tensor<P>,
    beta: &Tensor<P>,
    output: &mut Tensor<E>,
    rows: usize,
    groups: usize,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] last: bool,
    #[comptime] silu: bool,
    #[define(E, P)] _dtypes: [ElemType; 2],
) {
    let row_index = CUBE_POS;
    let row = row_of(row_index, rows, groups, input.shape(1), input.shape(2));
    let batch = row.batch;
    let mut partial = Shared::<[f32]>::new_slice(units);
    let mean = row_mean(input, batch, &row, &mut partial, units);
    let rstd = row_rstd(input, batch, &row, mean, eps, &mut partial, units);
    let mut i = UNIT_POS as usize;
    while i < row.count {
        let c = channel(&row, i, last);
        let x_hat = normalized_at(input, batch, &row, i, mean, rstd);
        let mut y = x_hat * f32::cast_from(gamma[c]) + f32::cast_from(beta[c]);
        if silu {
            y /= f32::new(1.0) + f32::exp(-y);
        }
        output[row_index * row.len + i] = E::cast_from(y);
        i += units;
    }
}

/// `ĝ`, `γ ⊙` the cotangent of row element `i` at the affine output `y = x̂ γ + β`,
/// through SiLU where `silu` (SiLU'(y) = σ(y) (1 + y (1 − σ(y)))).
#[cube]
#[allow(clippy::too_many_arguments)]
fn scaled_cotangent<G: Float, P: Float>(
    cotangent: &Tensor<G>,
    gamma: &Tensor<P>,
    beta: &Tensor<P>,
    row: &Row,
    i: usize,
    x_hat: f32,
    #[comptime] last: bool,
    #[comptime] silu: bool,
) -> f32 {
    let c = channel(row, i, last);
    let scale = f32::cast_from(gamma[c]);
    let mut g = f32::cast_from(cotangent[at(cotangent, row.batch, row, i)]);
    if silu {
        let y = x_hat * scale + f32::cast_from(beta[c]);
        let s = f32::new(1.0) / (f32::new(1.0) + f32::exp(-y));
        g *= s * (f32::new(1.0) + y * (f32::new(1.0) - s));
    }
    g * scale
}

/// One cube per row of the cotangent `g` `[b, m, n]`, plus `plus` (`g`'s shape) where
/// `add`; `input`'s rows are its batch repeated, so a row's batch in `input` is the
/// cotangent's modulo `input`'s batch. `x̂` and `ĝ` are read again for the output rather
/// than kept: a row can be 40960 values, far more than a cube's registers.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_pull_back_kernel<E: Float, G: Float, P: Float, Q: Float>(
    input: &Tensor<E>,
    cotangent: &Tensor<G>,
    gamma: &Tensor<P>,
    beta: &Tensor<P>,
    plus: &Tensor<Q>,
    output: &mut Tensor<E>,
    rows: usize,
    groups: usize,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] last: bool,
    #[comptime] silu: bool,
    #[comptime] add: bool,
    #[define(E, G, P, Q)] _dtypes: [ElemType; 4],
) {
    let row_index = CUBE_POS;
    let row = row_of(row_index, rows, groups, input.shape(1), input.shape(2));
    let batch = row.batch % input.shape(0);
    let mut partial = Shared::<[f32]>::new_slice(units);
    let mean = row_mean(input, batch, &row, &mut partial, units);
    let rstd = row_rstd(input, batch, &row, mean, eps, &mut partial, units);

    let mut sum_g = f32::new(0.0);
    let mut sum_gx = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < row.count {
        let x_hat = normalized_at(input, batch, &row, i, mean, rstd);
        let g_hat = scaled_cotangent(cotangent, gamma, beta, &row, i, x_hat, last, silu);
        sum_g += g_hat;
        sum_gx += g_hat * x_hat;
        i += units;
    }
    let mean_g = cube_sum(&mut partial, sum_g, units) / f32::cast_from(row.len);
    let mean_gx = cube_sum(&mut partial, sum_gx, units) / f32::cast_from(row.len);

    i = UNIT_POS as usize;
    while i < row.count {
        let x_hat = normalized_at(input, batch, &row, i, mean, rstd);
        let g_hat = scaled_cotangent(cotangent, gamma, beta, &row, i, x_hat, last, silu);
        let mut value = (g_hat - mean_g - x_hat * mean_gx) * rstd;
        if add {
            value += f32::cast_from(plus[at(plus, row.batch, &row, i)]);
        }
        output[row_index * row.len + i] = E::cast_from(value);
        i += units;
    }
}
