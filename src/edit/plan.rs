//! Everything about an edit that is fixed before sampling starts, in working, grid and latent
//! coordinates: the masks and cell pairs the energies compare (ALGORITHM.md §4, §7), the
//! gradient composition (§5.4), the initial-latent edit (§7), the attention policy (§6) and
//! which steps are guided.

use std::ops::RangeInclusive;

use super::coords::{Cell, Point, Spaces};
use super::mask::{Mask, Placement};
use super::spec::{Edit, Mode, ModeKind, Strengths};
use crate::error::{Error, Result};

/// How the engine departs from the official release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fidelity {
    /// Reproduce the official code's quirks (ALGORITHM.md §14) instead of fixing them:
    /// wrap-around shifts, truncated latent shifts, the drag x-clip by the height, and the
    /// in-place drag patch that also alters the step-0 reference latent. Only the parity tests
    /// want this; NaN guards stay on either way.
    pub reference_quirks: bool,
}

/// How the decoder self-attention sees the memory bank (ALGORITHM.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    /// K, V = the bank's (move).
    Replace,
    /// K, V = [own ; bank] along tokens (drag, face).
    Concat,
    /// K, V = [base bank outside the base mask ; reference bank inside the reference mask]
    /// (appearance, paste).
    MaskedReplace,
}

/// Feature-grid cell pairs `(generated, reference)` compared one to one. `reference` indexes a
/// `canvas`-sized grid (the guidance grid, or move's r-scaled canvas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellPairs {
    pub generated: Vec<usize>,
    pub reference: Vec<usize>,
    pub canvas: (usize, usize),
}

/// One drag or landmark pair on the guidance grid: 3x3 patches, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DragPatch {
    pub handle_center: Cell,
    pub target_center: Cell,
    pub handle: Vec<usize>,
    pub target: Vec<usize>,
    /// Handle cells outside the target patch (the leave-the-handle term).
    pub handle_only: Vec<usize>,
}

/// The energy terms of a mode and the masks they use, on the guidance grid.
#[derive(Debug, Clone)]
pub enum EnergyPlan {
    Move {
        /// Object cells at their destination (`Mcur`) paired with the r-scaled original (`Mtar`).
        edit: CellPairs,
        /// The object where it is (`Morg`).
        original: Mask,
        /// Neither the object's old nor its new place (`Mother`).
        other: Mask,
        /// Left behind by the object (`Mnov`).
        vacated: Mask,
        /// What the vacated region should look like: the user's region, else `other`.
        inpaint_reference: Mask,
    },
    /// Content dragging, and face landmarks (no content term, no leave-the-handle term).
    Drag {
        patches: Vec<DragPatch>,
        other: Option<Mask>,
        leave_handle: bool,
    },
    Appearance {
        base: Mask,
        replace: Mask,
    },
    Paste {
        base: Mask,
        edit: CellPairs,
    },
}

/// The edit of `z_T` before sampling (ALGORITHM.md §7).
#[derive(Debug, Clone)]
pub enum LatentEdit {
    None,
    /// Paste the transformed `z_T` of the original inside the transformed object mask.
    Move {
        rows: Placement,
        cols: Placement,
        mask: Mask,
    },
    /// Copy 3x3 latent patches, handle centre → target centre, in order; `in_place` as the
    /// reference's overlapping slice assignment.
    Drag {
        copies: Vec<(Cell, Cell)>,
        in_place: bool,
    },
    /// `z_base (1 − m) + shift(z_ref) m`.
    Paste {
        rows: Placement,
        cols: Placement,
        mask: Mask,
    },
}

/// Everything the sampler needs besides the models.
#[derive(Debug, Clone)]
pub struct EditPlan {
    pub kind: ModeKind,
    pub spaces: Spaces,
    pub strengths: Strengths,
    pub steps: usize,
    pub energy: EnergyPlan,
    /// Latent-grid region taking the editing gradient; `None`: the editing gradient everywhere.
    pub composite: Option<Mask>,
    /// κ of §5.4.
    pub kappa: f64,
    pub latent_edit: LatentEdit,
    pub injection: Injection,
    pub injection_steps: RangeInclusive<usize>,
    /// Steps `0..guided_steps` are guided.
    pub guided_steps: usize,
    /// Working-pixel masks of the masked-replace attention (base object, reference object).
    pub token_masks: Option<(Mask, Mask)>,
    /// Paste: scale of the reference image about its centre before encoding.
    pub reference_scale: f64,
}

fn trunc(v: f64) -> i64 {
    v.trunc() as i64
}

/// Pairs source cells (row-major on a `canvas`) with their destinations on the `(gh, gw)`
/// grid. Without quirks the k-th source goes with its own destination; the official code
/// pairs the k-th set cells of the two masks in row-major order, which differs only when a
/// wrap-around reorders them.
fn pair_cells(
    sources: &Mask,
    rows: &Placement,
    cols: &Placement,
    grid_w: usize,
    fidelity: Fidelity,
) -> CellPairs {
    let mut generated = Vec::new();
    let mut reference = Vec::new();
    for (i, &on) in sources.cells().iter().enumerate() {
        if !on {
            continue;
        }
        let (y, x) = (i / sources.w, i % sources.w);
        if let (Some(dy), Some(dx)) = (rows.forward(y), cols.forward(x)) {
            generated.push(dy * grid_w + dx);
            reference.push(i);
        }
    }
    if fidelity.reference_quirks {
        generated.sort_unstable();
    }
    CellPairs {
        generated,
        reference,
        canvas: (sources.h, sources.w),
    }
}

fn mask_of(indices: &[usize], (h, w): (usize, usize)) -> Mask {
    let mut m = Mask::empty(h, w);
    for &i in indices {
        m.set(i / w, i % w, true);
    }
    m
}

fn patch(center: Cell, grid_w: usize) -> Vec<usize> {
    let mut cells = Vec::with_capacity(9);
    for y in center.0 - 1..=center.0 + 1 {
        for x in center.1 - 1..=center.1 + 1 {
            cells.push(y * grid_w + x);
        }
    }
    cells
}

/// Guidance-grid centre of a working-pixel point, kept one cell from the border so its 3x3
/// patch fits (the official code clips x with the height: a quirk for non-square images).
fn patch_center(spaces: &Spaces, p: Point, fidelity: Fidelity) -> Cell {
    let (gh, gw) = spaces.grid();
    let (y, x) = spaces.working_to_grid_cell(p);
    let x_bound = if fidelity.reference_quirks { gh } else { gw };
    (y.clamp(1, gh - 2), x.clamp(1, x_bound.min(gw) - 2))
}

impl EditPlan {
    /// Builds the plan of `edit` at the working size `working` `(h, w)`.
    pub fn new(edit: &Edit, working: (usize, usize), fidelity: Fidelity) -> Result<Self> {
        let wrap = fidelity.reference_quirks;
        let input = (edit.image.height() as usize, edit.image.width() as usize);
        let spaces = Spaces::new(input, working);
        let (gh, gw) = spaces.grid();
        let (lh, lw) = spaces.latent();
        if gh < 3 || gw < 3 {
            return Err(Error::Spec(format!(
                "the working size {}x{} is too small",
                working.1, working.0
            )));
        }
        let steps = edit.steps;
        let kv_from = steps / 10;
        let kind = edit.mode.kind();
        let mut plan = Self {
            kind,
            spaces,
            strengths: edit.strengths,
            steps,
            energy: EnergyPlan::Appearance {
                base: Mask::empty(0, 0),
                replace: Mask::empty(0, 0),
            },
            composite: None,
            kappa: 0.04,
            latent_edit: LatentEdit::None,
            injection: Injection::Concat,
            injection_steps: kv_from..=steps.saturating_sub(1),
            guided_steps: steps * 3 / 5,
            token_masks: None,
            reference_scale: 1.0,
        };
        match &edit.mode {
            Mode::Move {
                mask,
                arrow,
                scale,
                reference_region,
            } => {
                let object = spaces.mask_input_to_working(mask);
                let d = spaces.input_offset_to_working(*arrow);
                let r = *scale;
                let original = spaces.mask_working_to_grid(&object);
                let shift = |v: f64| spaces.working_offset_to_grid_cells_scaled(v, r);
                let rows = Placement::new(gh, r, shift(d.y), wrap);
                let cols = Placement::new(gw, r, shift(d.x), wrap);
                let scaled = object.nearest(rows.scaled, cols.scaled);
                let edit_pairs = pair_cells(&scaled, &rows, &cols, gw, fidelity);
                if edit_pairs.generated.is_empty() {
                    return Err(Error::Spec(
                        "the arrow moves the object entirely outside the image: make it shorter"
                            .into(),
                    ));
                }
                let current = mask_of(&edit_pairs.generated, (gh, gw));
                let other = current.or(&original).not();
                let vacated = original.and_not(&current);
                let inpaint_reference = match reference_region {
                    Some(m) => spaces.mask_working_to_grid(&spaces.mask_input_to_working(m)),
                    None => other.clone(),
                };
                plan.composite = Some(spaces.mask_grid_to_latent(&current));
                plan.kappa = 0.08;
                let latent_object = spaces.mask_working_to_latent(&object);
                let latent = |v: f64| spaces.working_offset_to_latent_cells(v * r, wrap);
                let lrows = Placement::new(lh, r, latent(d.y), wrap);
                let lcols = Placement::new(lw, r, latent(d.x), wrap);
                plan.latent_edit = LatentEdit::Move {
                    mask: latent_object.placed(&lrows, &lcols),
                    rows: lrows,
                    cols: lcols,
                };
                plan.injection = Injection::Replace;
                plan.energy = EnergyPlan::Move {
                    edit: edit_pairs,
                    original,
                    other,
                    vacated,
                    inpaint_reference,
                };
            }
            Mode::Drag { points, .. } | Mode::FaceLandmarks { points } => {
                let region = match &edit.mode {
                    Mode::Drag { mask, .. } => Some(spaces.mask_input_to_working(mask)),
                    _ => None,
                };
                let mut patches = Vec::with_capacity(points.len());
                let mut copies = Vec::with_capacity(points.len());
                for &(handle, target) in points {
                    let hc = patch_center(&spaces, spaces.input_to_working(handle), fidelity);
                    let tc = patch_center(&spaces, spaces.input_to_working(target), fidelity);
                    let h = patch(hc, gw);
                    let t = patch(tc, gw);
                    let handle_only = h.iter().copied().filter(|c| !t.contains(c)).collect();
                    patches.push(DragPatch {
                        handle_center: hc,
                        target_center: tc,
                        handle: h,
                        target: t,
                        handle_only,
                    });
                    let latent = |c: Cell| {
                        let (y, x) = spaces.grid_to_latent_cell(c);
                        (y.clamp(1, lh - 2), x.clamp(1, lw - 2))
                    };
                    copies.push((latent(hc), latent(tc)));
                }
                plan.injection = Injection::Concat;
                match region {
                    Some(region) => {
                        plan.composite = Some(spaces.mask_working_to_latent(&region));
                        plan.latent_edit = LatentEdit::Drag {
                            copies,
                            in_place: fidelity.reference_quirks,
                        };
                        plan.energy = EnergyPlan::Drag {
                            patches,
                            other: Some(spaces.mask_working_to_grid(&region).not()),
                            leave_handle: true,
                        };
                    }
                    None => {
                        plan.energy = EnergyPlan::Drag {
                            patches,
                            other: None,
                            leave_handle: false,
                        };
                    }
                }
            }
            Mode::Appearance {
                mask,
                reference_mask,
            } => {
                let base_px = spaces.mask_input_to_working(mask);
                let replace_px = reference_mask.bilinear_any(working.0, working.1);
                let base = spaces.mask_working_to_grid(&base_px);
                let replace = spaces.mask_working_to_grid(&replace_px);
                if replace.is_empty() || base.is_empty() {
                    return Err(Error::Spec(
                        "a mask covers less than one 4x4 cell at the working size: mark a larger object"
                            .into(),
                    ));
                }
                plan.composite = Some(spaces.mask_grid_to_latent(&base));
                plan.injection = Injection::MaskedReplace;
                plan.injection_steps = 0..=steps * 35 / 50;
                plan.token_masks = Some((base_px, replace_px));
                plan.energy = EnergyPlan::Appearance { base, replace };
            }
            Mode::Paste {
                reference_mask,
                offset,
                scale,
            } => {
                let (h, w) = working;
                let d = spaces.input_offset_to_working(*offset);
                let r = *scale;
                let in_reference = reference_mask.bilinear_any(h, w).placed(
                    &Placement::new(h, r, 0, false),
                    &Placement::new(w, r, 0, false),
                );
                let base_px = in_reference.placed(
                    &Placement::new(h, 1.0, trunc(d.y), wrap),
                    &Placement::new(w, 1.0, trunc(d.x), wrap),
                );
                let base = spaces.mask_working_to_grid(&base_px);
                // Reference cells: the base cells shifted back by the offset in grid cells.
                let cells = |v: f64| -spaces.working_offset_to_grid_cells(v);
                let back_rows = Placement::new(gh, 1.0, cells(d.y), wrap);
                let back_cols = Placement::new(gw, 1.0, cells(d.x), wrap);
                let back = pair_cells(&base, &back_rows, &back_cols, gw, fidelity);
                // pair_cells maps base → reference; the energy wants (generated = base cell,
                // reference = its source).
                let edit_pairs = CellPairs {
                    generated: back.reference,
                    reference: back.generated,
                    canvas: (gh, gw),
                };
                if edit_pairs.generated.is_empty() {
                    return Err(Error::Spec(
                        "the pasted object ends up outside the image: change the offset".into(),
                    ));
                }
                plan.composite = Some(spaces.mask_grid_to_latent(&base));
                plan.injection = Injection::MaskedReplace;
                plan.injection_steps = 0..=steps * 35 / 50;
                plan.token_masks = Some((base_px, in_reference));
                plan.reference_scale = r;
                plan.latent_edit = LatentEdit::Paste {
                    rows: Placement::new(
                        lh,
                        1.0,
                        spaces.working_offset_to_latent_cells(d.y, wrap),
                        wrap,
                    ),
                    cols: Placement::new(
                        lw,
                        1.0,
                        spaces.working_offset_to_latent_cells(d.x, wrap),
                        wrap,
                    ),
                    mask: spaces.mask_grid_to_latent(&base),
                };
                plan.energy = EnergyPlan::Paste {
                    base,
                    edit: edit_pairs,
                };
            }
        }
        Ok(plan)
    }

    /// The drag quirk: the reference patches `z_T` in place on a view of the last inversion
    /// latent, so the step-0 reference latent is the patched `z_T` itself.
    pub fn step0_reference_is_initial_latent(&self) -> bool {
        matches!(self.latent_edit, LatentEdit::Drag { in_place: true, .. })
    }

    pub fn is_guided(&self, step: usize) -> bool {
        step < self.guided_steps
    }

    pub fn injects(&self, step: usize) -> bool {
        self.injection_steps.contains(&step)
    }

    /// Batch of the inversion: the photo, plus the reference image in cross-image modes.
    pub fn inversion_batch(&self) -> usize {
        if self.kind.needs_reference() { 2 } else { 1 }
    }

    /// The guidance-grid masks under the names of the reference fixtures'
    /// `first_guided_step.npz`, as 0/1 grids.
    pub fn trace_masks(&self) -> Vec<(&'static str, Mask)> {
        let grid = self.spaces.grid();
        match &self.energy {
            EnergyPlan::Move {
                edit,
                original,
                other,
                vacated,
                ..
            } => {
                let current = Mask::from_cells(&edit.generated, grid);
                vec![
                    ("mask_tar", Mask::from_cells(&edit.reference, edit.canvas)),
                    ("mask_overlap", current.and(original)),
                    ("mask_cur", current),
                    ("mask_other", other.clone()),
                    ("mask_non_overlap", vacated.clone()),
                ]
            }
            EnergyPlan::Drag {
                other: Some(other), ..
            } => vec![("mask_other", other.clone())],
            EnergyPlan::Drag { other: None, .. } => Vec::new(),
            EnergyPlan::Appearance { base, replace } => vec![
                ("mask_base_cur", base.clone()),
                ("mask_replace_cur", replace.clone()),
            ],
            EnergyPlan::Paste { base, edit } => vec![
                ("mask_base_cur", base.clone()),
                (
                    "mask_replace_cur",
                    Mask::from_cells(&edit.reference, edit.canvas),
                ),
            ],
        }
    }

    /// Bank entries the sampler reads.
    pub fn bank_steps(&self) -> RangeInclusive<usize> {
        self.injection_steps.clone()
    }
}
