//! Tensor side of the geometric edits: placing a tensor by per-axis [`Placement`]s, and the
//! initial-latent edits of ALGORITHM.md §7 applied to `z_T` before sampling.

use burn::tensor::{Int, Tensor, TensorData};

use super::coords::Cell;
use super::mask::{Mask, Placement};
use super::plan::LatentEdit;
use crate::device::read_back;
use crate::error::Result;

/// `t` `[B, C, H, W]` placed per axis: output cell `(y, x)` takes `t[.., rows.source(y),
/// cols.source(x)]`, and zero where the placement leaves it empty (the reference pads with 0).
pub fn place(t: Tensor<4>, rows: &Placement, cols: &Placement) -> Tensor<4> {
    let device = t.device();
    let axis = |p: &Placement| -> (Tensor<1, Int>, Vec<bool>) {
        let src: Vec<Option<usize>> = (0..p.len).map(|o| p.source(o)).collect();
        let idx: Vec<i32> = src.iter().map(|s| s.unwrap_or(0) as i32).collect();
        let n = idx.len();
        (
            Tensor::from_ints(TensorData::new(idx, [n]), &device),
            src.iter().map(Option::is_some).collect(),
        )
    };
    let (ri, rv) = axis(rows);
    let (ci, cv) = axis(cols);
    let placed = t.select(2, ri).select(3, ci);
    if rv.iter().all(|&v| v) && cv.iter().all(|&v| v) {
        return placed;
    }
    let valid = Mask::from_fn(rows.len, cols.len, |y, x| rv[y] && cv[x]);
    placed * mask_tensor(&valid, &device)
}

/// A `[1, 1, h, w]` 0/1 tensor.
pub fn mask_tensor(m: &Mask, device: &burn::tensor::Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(m.to_f32(), [1, 1, m.h, m.w]), device)
}

fn blend(base: Tensor<4>, pasted: Tensor<4>, mask: &Mask) -> Tensor<4> {
    let m = mask_tensor(mask, &base.device());
    base * (m.clone().neg() + 1.0) + pasted * m
}

/// Copies the 3x3 block around `src` to the block around `dst`, pair after pair (a later pair
/// sees the earlier copies). Centres are at least one cell from the border. With `in_place`
/// the copy runs element by element in memory order on the live latent, as the reference's
/// overlapping in-place slice assignment does (a block overlapping its own source then reads
/// values it has just written); otherwise each block is read whole before it is written.
async fn copy_patches(z: Tensor<4>, copies: &[(Cell, Cell)], in_place: bool) -> Result<Tensor<4>> {
    let device = z.device();
    let [b, c, h, w] = z.dims();
    let mut v = read_back(z).await?;
    let offsets: Vec<(usize, usize)> = (0..3).flat_map(|i| (0..3).map(move |j| (i, j))).collect();
    for &((sy, sx), (dy, dx)) in copies {
        for plane in 0..b * c {
            let base = plane * h * w;
            let src = |i: usize, j: usize| base + (sy + i - 1) * w + sx + j - 1;
            let dst = |i: usize, j: usize| base + (dy + i - 1) * w + dx + j - 1;
            if in_place {
                for &(i, j) in &offsets {
                    v[dst(i, j)] = v[src(i, j)];
                }
            } else {
                let block: Vec<f32> = offsets.iter().map(|&(i, j)| v[src(i, j)]).collect();
                for (&(i, j), val) in offsets.iter().zip(block) {
                    v[dst(i, j)] = val;
                }
            }
        }
    }
    Ok(Tensor::from_data(TensorData::new(v, [b, c, h, w]), &device))
}

/// Applies the initial-latent edit to the last inversion latent `z_t` `[B, 4, h, w]` (B = 2 in
/// cross-image modes: base, reference) and returns the `[1, 4, h, w]` latent sampling starts
/// from.
pub async fn initial_latent(edit: &LatentEdit, z_t: Tensor<4>) -> Result<Tensor<4>> {
    let base = z_t.clone().narrow(0, 0, 1);
    Ok(match edit {
        LatentEdit::None => base,
        LatentEdit::Move { rows, cols, mask } => {
            let moved = place(base.clone(), rows, cols);
            blend(base, moved, mask)
        }
        LatentEdit::Drag { copies, in_place } => copy_patches(base, copies, *in_place).await?,
        LatentEdit::Paste { rows, cols, mask } => {
            let last = z_t.dims()[0] - 1;
            let reference = z_t.narrow(0, last, 1);
            blend(base, place(reference, rows, cols), mask)
        }
    })
}
