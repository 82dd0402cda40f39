//! The energies of ALGORITHM.md §4 on the two feature levels, as differentiable burn ops.
//!
//! Masks live on the guidance grid (working / 4), but every feature map is a nearest upsampling
//! of a coarser map, so a mean over grid cells is a weighted mean over feature cells. The
//! energies gather only the feature cells a mask touches, weighted by how many grid cells map
//! to each, instead of materialising the upsampled maps (1280 x 128 x 128 at 512 px).

use std::collections::HashMap;

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::mask::{Mask, nearest_source};
use super::plan::{CellPairs, EditPlan, EnergyPlan};

/// PyTorch's `CosineSimilarity` eps.
const COS_EPS: f64 = 1e-8;
/// Lower bound of the `1 + 4·x` denominators: with the raw cosine of move mode it reaches 0
/// at cos = −0.25, where the official code divides by zero (ALGORITHM.md §4.1).
const MIN_DENOMINATOR: f64 = 0.1;

/// One feature level: `[C, h·w]` maps of the generated branch and of the reference(s).
pub struct Level {
    pub generated: Tensor<2>,
    pub reference: Tensor<2>,
    /// The second image's features (appearance, paste).
    pub replace: Option<Tensor<2>>,
    /// `(h, w)` of the feature map.
    pub size: (usize, usize),
}

impl Level {
    /// From `[1, C, h, w]` maps.
    pub fn new(generated: Tensor<4>, reference: Tensor<4>, replace: Option<Tensor<4>>) -> Self {
        let [_, c, h, w] = generated.dims();
        let flat = |t: Tensor<4>| t.reshape([c, h * w]);
        Self {
            generated: flat(generated),
            reference: flat(reference),
            replace: replace.map(flat),
            size: (h, w),
        }
    }
}

/// The two energies, already multiplied by λ = energy_scale · 1000. `None`: the mode has no
/// such term, or every one of its masks is empty (the official code returns NaN there).
pub struct Energies {
    pub edit: Option<Tensor<1>>,
    pub content: Option<Tensor<1>>,
}

/// Feature cell of grid cell `i` on a `canvas`-sized grid upsampled (nearest) from `size`.
fn feature_cell(i: usize, canvas: (usize, usize), size: (usize, usize)) -> usize {
    let (y, x) = (i / canvas.1, i % canvas.1);
    nearest_source(y, size.0, canvas.0) * size.1 + nearest_source(x, size.1, canvas.1)
}

/// Unique feature cells of a grid mask with their weights (fraction of the mask's cells).
fn mask_weights(mask: &Mask, size: (usize, usize)) -> (Vec<usize>, Vec<f32>) {
    let total = mask.count();
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for i in mask.indices() {
        *counts
            .entry(feature_cell(i, (mask.h, mask.w), size))
            .or_default() += 1;
    }
    let mut cells: Vec<(usize, usize)> = counts.into_iter().collect();
    cells.sort_unstable();
    let weights = cells
        .iter()
        .map(|&(_, n)| n as f32 / total as f32)
        .collect();
    (cells.into_iter().map(|(c, _)| c).collect(), weights)
}

fn indices(cells: &[usize], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i32> = cells.iter().map(|&c| c as i32).collect();
    let n = v.len();
    Tensor::from_ints(TensorData::new(v, [n]), device)
}

fn weights(w: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = w.len();
    Tensor::from_data(TensorData::new(w, [n]), device)
}

/// Cosine similarity of matching columns of `[C, n]` maps → `[n]`, as PyTorch computes it:
/// each vector divided by its norm clamped at eps.
fn cos_columns(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let n = a.dims()[1];
    let norm = |t: Tensor<2>| t.square().sum_dim(0).clamp_min(COS_EPS * COS_EPS).sqrt();
    let na = norm(a.clone());
    let nb = norm(b.clone());
    ((a / na) * (b / nb)).sum_dim(0).reshape([n])
}

/// How similarity is measured: the raw cosine, or `s = (cos + 1) / 2`.
#[derive(Clone, Copy)]
enum Sim {
    Cos,
    Shifted,
}

fn apply(sim: Sim, cos: Tensor<1>) -> Tensor<1> {
    match sim {
        Sim::Cos => cos,
        Sim::Shifted => (cos + 1.0) / 2.0,
    }
}

/// Mean over the grid cells of `mask` of the similarity of `a` and `b` at the same position.
fn same_position_mean(
    a: &Tensor<2>,
    b: &Tensor<2>,
    mask: &Mask,
    size: (usize, usize),
    sim: Sim,
) -> Option<Tensor<1>> {
    if mask.is_empty() {
        return None;
    }
    let device = a.device();
    let (cells, w) = mask_weights(mask, size);
    let idx = indices(&cells, &device);
    let cos = cos_columns(a.clone().select(1, idx.clone()), b.clone().select(1, idx));
    Some((apply(sim, cos) * weights(w, &device)).sum())
}

/// Grid cells compared one to one: `gen_cells[k]` (on `gen_canvas`) with `ref_cells[k]` (on
/// `ref_canvas`).
#[derive(Clone, Copy)]
struct Pairing<'a> {
    gen_cells: &'a [usize],
    gen_canvas: (usize, usize),
    ref_cells: &'a [usize],
    ref_canvas: (usize, usize),
}

/// Mean over cell pairs of the similarity of `generated` at one cell with `reference` at its
/// partner. Pairs falling on the same two feature cells are merged with a weight.
fn paired_mean(
    generated: &Tensor<2>,
    reference: &Tensor<2>,
    pairs: Pairing,
    size: (usize, usize),
    sim: Sim,
) -> Option<Tensor<1>> {
    let Pairing {
        gen_cells,
        gen_canvas,
        ref_cells,
        ref_canvas,
    } = pairs;
    if gen_cells.is_empty() {
        return None;
    }
    let mut counts: HashMap<(usize, usize), usize> = HashMap::new();
    for (&g, &r) in gen_cells.iter().zip(ref_cells) {
        let key = (
            feature_cell(g, gen_canvas, size),
            feature_cell(r, ref_canvas, size),
        );
        *counts.entry(key).or_default() += 1;
    }
    let mut pairs: Vec<((usize, usize), usize)> = counts.into_iter().collect();
    pairs.sort_unstable();
    let total = gen_cells.len() as f32;
    let device = generated.device();
    let gi = indices(&pairs.iter().map(|p| p.0.0).collect::<Vec<_>>(), &device);
    let ri = indices(&pairs.iter().map(|p| p.0.1).collect::<Vec<_>>(), &device);
    let w = pairs.iter().map(|p| p.1 as f32 / total).collect();
    let cos = cos_columns(
        generated.clone().select(1, gi),
        reference.clone().select(1, ri),
    );
    Some((apply(sim, cos) * weights(w, &device)).sum())
}

/// Mean feature vector `[C, 1]` over the grid cells of `mask`.
fn pooled(f: &Tensor<2>, mask: &Mask, size: (usize, usize)) -> Option<Tensor<2>> {
    if mask.is_empty() {
        return None;
    }
    let device = f.device();
    let (cells, w) = mask_weights(mask, size);
    let n = w.len();
    let w = Tensor::<2>::from_data(TensorData::new(w, [n, 1]), &device);
    Some(f.clone().select(1, indices(&cells, &device)).matmul(w))
}

/// `w / (1 + 4·x)`, the reference's energy shape, with the denominator kept positive.
fn inverse(w: f64, x: Tensor<1>) -> Tensor<1> {
    (x * 4.0 + 1.0).clamp_min(MIN_DENOMINATOR).recip() * w
}

fn add(acc: Option<Tensor<1>>, term: Option<Tensor<1>>) -> Option<Tensor<1>> {
    match (acc, term) {
        (Some(a), Some(t)) => Some(a + t),
        (a, t) => a.or(t),
    }
}

/// The cross-image modes' content energy on one level: `w / (1 + 4·s)` of the generated and
/// base features at the same positions over the base image's background.
fn background_term(level: &Level, background: &Mask, w: f64) -> Option<Tensor<1>> {
    same_position_mean(
        &level.generated,
        &level.reference,
        background,
        level.size,
        Sim::Shifted,
    )
    .map(|m| inverse(w, m))
}

/// The editing and content energies of `plan` on `levels` (the generated features of the
/// editing energy and of the content energy may come from different batch rows: `edit_levels`
/// and `content_levels`).
pub fn energies(plan: &EditPlan, edit_levels: &[Level], content_levels: &[Level]) -> Energies {
    let s = &plan.strengths;
    let lambda = s.energy_scale * 1000.0;
    let grid = plan.spaces.grid();
    let mut edit = None;
    let mut content = None;
    match &plan.energy {
        EnergyPlan::Move {
            edit: pairs,
            other,
            vacated,
            inpaint_reference,
            ..
        } => {
            for (le, lc) in edit_levels.iter().zip(content_levels) {
                let CellPairs {
                    generated,
                    reference,
                    canvas,
                } = pairs;
                let pairing = Pairing {
                    gen_cells: generated,
                    gen_canvas: grid,
                    ref_cells: reference,
                    ref_canvas: *canvas,
                };
                let m = paired_mean(&le.generated, &le.reference, pairing, le.size, Sim::Cos);
                edit = add(edit, m.map(|m| inverse(0.5 * s.w_edit, m)));
                let (g, r) = (&lc.generated, &lc.reference);
                let consistency = same_position_mean(r, g, other, lc.size, Sim::Cos)
                    .map(|m| inverse(0.5 * s.w_content, m));
                let contrast = same_position_mean(g, r, vacated, lc.size, Sim::Shifted)
                    .map(|m| m * (0.5 * s.w_contrast));
                let inpaint = match (
                    pooled(g, vacated, lc.size),
                    pooled(r, inpaint_reference, lc.size),
                ) {
                    (Some(a), Some(b)) => {
                        Some(inverse(s.w_inpaint, apply(Sim::Shifted, cos_columns(a, b))))
                    }
                    _ => None,
                };
                content = add(add(add(content, consistency), contrast), inpaint);
            }
        }
        EnergyPlan::Drag {
            patches,
            other,
            leave_handle,
        } => {
            let per = 1.0 / (edit_levels.len() * patches.len()) as f64;
            for (le, lc) in edit_levels.iter().zip(content_levels) {
                for p in patches {
                    let pairing = Pairing {
                        gen_cells: &p.target,
                        gen_canvas: grid,
                        ref_cells: &p.handle,
                        ref_canvas: grid,
                    };
                    let m =
                        paired_mean(&le.generated, &le.reference, pairing, le.size, Sim::Shifted);
                    edit = add(edit, m.map(|m| inverse(per * s.w_edit, m)));
                    if *leave_handle {
                        let cells = Mask::from_cells(&p.handle_only, grid);
                        let m = same_position_mean(
                            &le.generated,
                            &le.reference,
                            &cells,
                            le.size,
                            Sim::Shifted,
                        );
                        edit = add(edit, m.map(|m| m * (per * s.w_inpaint)));
                    }
                }
                if let Some(other) = other {
                    let m = same_position_mean(
                        &lc.reference,
                        &lc.generated,
                        other,
                        lc.size,
                        Sim::Shifted,
                    );
                    let per_level = 1.0 / content_levels.len() as f64;
                    content = add(content, m.map(|m| inverse(per_level * s.w_content, m)));
                }
            }
        }
        EnergyPlan::Appearance { base, replace } => {
            let background = base.not();
            for (le, lc) in edit_levels.iter().zip(content_levels) {
                content = add(content, background_term(lc, &background, s.w_content));
                let replace_features = le.replace.as_ref().unwrap_or(&le.reference);
                if let (Some(a), Some(b)) = (
                    pooled(&le.generated, base, le.size),
                    pooled(replace_features, replace, le.size),
                ) {
                    let x = apply(Sim::Shifted, cos_columns(a, b));
                    edit = add(edit, Some(inverse(s.w_edit, x)));
                }
            }
        }
        EnergyPlan::Paste { base, edit: pairs } => {
            let background = base.not();
            for (le, lc) in edit_levels.iter().zip(content_levels) {
                content = add(content, background_term(lc, &background, s.w_content));
                let replace_features = le.replace.as_ref().unwrap_or(&le.reference);
                let pairing = Pairing {
                    gen_cells: &pairs.generated,
                    gen_canvas: grid,
                    ref_cells: &pairs.reference,
                    ref_canvas: pairs.canvas,
                };
                let m = paired_mean(
                    &le.generated,
                    replace_features,
                    pairing,
                    le.size,
                    Sim::Shifted,
                );
                edit = add(edit, m.map(|m| inverse(s.w_edit, m)));
            }
        }
    }
    Energies {
        edit: edit.map(|e| e * lambda),
        content: content.map(|e| e * lambda),
    }
}
