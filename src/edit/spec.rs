//! The edit spec: one JSON shape for the CLI and the web page, for every mode, validated once
//! at the boundary with messages that say what to change.
//!
//! Images and masks are named by strings that the shell resolves to PNG bytes: a path relative
//! to the spec for the CLI, a name of a canvas layer for the page. Points are `[x, y]` in the
//! user's image pixels.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::coords::Point;
use super::mask::Mask;
use crate::error::{Error, Result};

/// A handle → target pair, `[x, y]` in input pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PointPair {
    pub handle: [f64; 2],
    pub target: [f64; 2],
}

/// What to do, per mode (ALGORITHM.md §4, §7, §8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ModeSpec {
    /// Object moving (and resizing with `scale` ≠ 1): the object under `mask` follows the arrow
    /// `from` → `to`. `reference_region` optionally marks what the vacated area should look like.
    #[serde(alias = "resize")]
    Move {
        mask: String,
        from: [f64; 2],
        to: [f64; 2],
        #[serde(default = "one")]
        scale: f64,
        #[serde(default)]
        reference_region: Option<String>,
    },
    /// Appearance replacing: the object under `mask` takes the look of the object under
    /// `reference_mask` in the reference image.
    Appearance {
        mask: String,
        reference_mask: String,
        #[serde(default)]
        reference: Option<String>,
        #[serde(default)]
        reference_prompt: Option<String>,
    },
    /// Object pasting: the object under `reference_mask` (in the reference image) is pasted
    /// into the photo, shifted by `offset` `[dx, dy]` pixels and scaled by `scale`.
    Paste {
        reference_mask: String,
        #[serde(default)]
        offset: [f64; 2],
        #[serde(default = "one")]
        scale: f64,
        #[serde(default)]
        reference: Option<String>,
        #[serde(default)]
        reference_prompt: Option<String>,
    },
    /// Content dragging: inside the editable `mask`, each handle point moves to its target.
    Drag {
        mask: String,
        points: Vec<PointPair>,
    },
    /// Face-landmark dragging: landmark k of the face (handle) moves to landmark k of the
    /// target face (17 or 68 dlib landmarks, or any subset).
    FaceLandmarks { points: Vec<PointPair> },
}

fn one() -> f64 {
    1.0
}

/// The mode without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeKind {
    Move,
    Appearance,
    Paste,
    Drag,
    FaceLandmarks,
}

impl ModeKind {
    pub const ALL: [ModeKind; 5] = [
        Self::Move,
        Self::Appearance,
        Self::Paste,
        Self::Drag,
        Self::FaceLandmarks,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Move => "move",
            Self::Appearance => "appearance",
            Self::Paste => "paste",
            Self::Drag => "drag",
            Self::FaceLandmarks => "face_landmarks",
        }
    }

    /// Whether the mode edits with a second image.
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Appearance | Self::Paste)
    }

    /// The reference's defaults (ALGORITHM.md §8; energy_scale is the UI's "x1e3" value).
    pub fn default_strengths(self) -> Strengths {
        let s = |g, e, we, wc, wct, wi| Strengths {
            guidance_scale: g,
            energy_scale: e,
            w_edit: we,
            w_content: wc,
            w_contrast: wct,
            w_inpaint: wi,
        };
        match self {
            Self::Move => s(4.0, 0.5, 4.0, 6.0, 0.2, 0.8),
            Self::Appearance => s(5.0, 2.0, 3.5, 5.0, 0.0, 0.0),
            Self::Paste => s(4.0, 1.5, 4.0, 6.0, 0.0, 0.0),
            Self::Drag => s(4.0, 2.0, 4.0, 6.0, 0.0, 0.2),
            Self::FaceLandmarks => s(4.0, 3.0, 12.0, 0.0, 0.0, 0.0),
        }
    }

    /// The prompt used when the spec gives none.
    pub fn default_prompt(self) -> &'static str {
        match self {
            Self::FaceLandmarks => "a photo of a human face",
            _ => "",
        }
    }
}

impl ModeSpec {
    pub fn kind(&self) -> ModeKind {
        match self {
            Self::Move { .. } => ModeKind::Move,
            Self::Appearance { .. } => ModeKind::Appearance,
            Self::Paste { .. } => ModeKind::Paste,
            Self::Drag { .. } => ModeKind::Drag,
            Self::FaceLandmarks { .. } => ModeKind::FaceLandmarks,
        }
    }
}

/// Every strength; unset ones take the mode's default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Strengths {
    /// Classifier-free guidance scale g.
    pub guidance_scale: f64,
    /// The UI's "classifier guidance strength (x1e3)": λ = energy_scale · 1000.
    pub energy_scale: f64,
    pub w_edit: f64,
    pub w_content: f64,
    /// Move: the vacated region's contrast term.
    pub w_contrast: f64,
    /// Move: the vacated region's background match; drag: the leave-the-handle term.
    pub w_inpaint: f64,
}

/// Strength overrides as written in the JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrengthOverrides {
    pub guidance_scale: Option<f64>,
    pub energy_scale: Option<f64>,
    pub w_edit: Option<f64>,
    pub w_content: Option<f64>,
    pub w_contrast: Option<f64>,
    pub w_inpaint: Option<f64>,
}

/// The whole spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditSpec {
    #[serde(flatten)]
    pub mode: ModeSpec,
    /// Describes the photo, e.g. "a photo of a cup"; empty by default.
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Working resolution R: the photo is worked at about R x R pixels.
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    #[serde(default)]
    pub strengths: StrengthOverrides,
}

fn default_steps() -> usize {
    50
}
fn default_seed() -> u64 {
    42
}
fn default_resolution() -> u32 {
    512
}

const COMMON_KEYS: &[&str] = &["mode", "prompt", "steps", "seed", "resolution", "strengths"];

fn mode_keys(mode: &str) -> Option<&'static [&'static str]> {
    Some(match mode {
        "move" | "resize" => &["mask", "from", "to", "scale", "reference_region"],
        "appearance" => &["mask", "reference_mask", "reference", "reference_prompt"],
        "paste" => &[
            "reference_mask",
            "offset",
            "scale",
            "reference",
            "reference_prompt",
        ],
        "drag" => &["mask", "points"],
        "face_landmarks" => &["points"],
        _ => return None,
    })
}

impl EditSpec {
    /// Parses the JSON, refusing unknown fields (a misspelt strength would otherwise be
    /// silently ignored).
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Spec(format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::Spec("the spec must be a JSON object".into()))?;
        let mode = obj.get("mode").and_then(|m| m.as_str()).ok_or_else(|| {
            Error::Spec(
                "missing \"mode\": one of move, resize, appearance, paste, drag, face_landmarks"
                    .into(),
            )
        })?;
        let keys = mode_keys(mode).ok_or_else(|| {
            Error::Spec(format!(
                "unknown mode \"{mode}\": use move, resize, appearance, paste, drag or face_landmarks"
            ))
        })?;
        for key in obj.keys() {
            if !COMMON_KEYS.contains(&key.as_str()) && !keys.contains(&key.as_str()) {
                return Err(Error::Spec(format!(
                    "unknown field \"{key}\" for mode {mode}; allowed: {}",
                    COMMON_KEYS
                        .iter()
                        .chain(keys.iter())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        serde_json::from_value(value).map_err(|e| Error::Spec(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn strengths(&self) -> Strengths {
        let d = self.mode.kind().default_strengths();
        let o = &self.strengths;
        Strengths {
            guidance_scale: o.guidance_scale.unwrap_or(d.guidance_scale),
            energy_scale: o.energy_scale.unwrap_or(d.energy_scale),
            w_edit: o.w_edit.unwrap_or(d.w_edit),
            w_content: o.w_content.unwrap_or(d.w_content),
            w_contrast: o.w_contrast.unwrap_or(d.w_contrast),
            w_inpaint: o.w_inpaint.unwrap_or(d.w_inpaint),
        }
    }

    /// The reference image named in the spec, if any.
    pub fn reference(&self) -> Option<&str> {
        match &self.mode {
            ModeSpec::Appearance { reference, .. } | ModeSpec::Paste { reference, .. } => {
                reference.as_deref()
            }
            _ => None,
        }
    }
}

/// A spec with its masks loaded and every value checked against the images: what the engine
/// runs. Coordinates are still in input pixels (of the photo, or of the reference image for
/// the reference mask).
#[derive(Debug, Clone)]
pub struct Edit {
    pub mode: Mode,
    pub prompt: String,
    pub reference_prompt: String,
    pub steps: usize,
    pub seed: u64,
    pub resolution: u32,
    pub strengths: Strengths,
    pub image: RgbImage,
    pub reference: Option<RgbImage>,
}

/// A mode with its masks decoded.
#[derive(Debug, Clone)]
pub enum Mode {
    Move {
        mask: Mask,
        arrow: Point,
        scale: f64,
        reference_region: Option<Mask>,
    },
    Appearance {
        mask: Mask,
        reference_mask: Mask,
    },
    Paste {
        reference_mask: Mask,
        offset: Point,
        scale: f64,
    },
    Drag {
        mask: Mask,
        points: Vec<(Point, Point)>,
    },
    FaceLandmarks {
        points: Vec<(Point, Point)>,
    },
}

impl Mode {
    pub fn kind(&self) -> ModeKind {
        match self {
            Self::Move { .. } => ModeKind::Move,
            Self::Appearance { .. } => ModeKind::Appearance,
            Self::Paste { .. } => ModeKind::Paste,
            Self::Drag { .. } => ModeKind::Drag,
            Self::FaceLandmarks { .. } => ModeKind::FaceLandmarks,
        }
    }
}

/// Accepted range of the move scale (the reference UI's slider is 0–10) and of the paste
/// scale (0–1.5); 0 itself would erase the object.
pub const MOVE_SCALE: (f64, f64) = (0.1, 10.0);
pub const PASTE_SCALE: (f64, f64) = (0.1, 1.5);
/// Steps accepted (the schedule has 1000 training steps).
pub const MAX_STEPS: usize = 1000;

impl EditSpec {
    /// Loads the masks (through `load`, which turns a name into PNG bytes) and
    /// checks everything against `image` and `reference`.
    pub fn resolve(
        &self,
        image: RgbImage,
        reference: Option<RgbImage>,
        load: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
    ) -> Result<Edit> {
        let kind = self.mode.kind();
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::Spec(format!(
                "steps must be between 1 and {MAX_STEPS}, got {}",
                self.steps
            )));
        }
        if !(64..=2048).contains(&self.resolution) {
            return Err(Error::Spec(format!(
                "resolution must be between 64 and 2048 pixels, got {} (512 suits SD 1.5)",
                self.resolution
            )));
        }
        let strengths = self.strengths();
        for (name, v) in [
            ("guidance_scale", strengths.guidance_scale),
            ("energy_scale", strengths.energy_scale),
            ("w_edit", strengths.w_edit),
            ("w_content", strengths.w_content),
            ("w_contrast", strengths.w_contrast),
            ("w_inpaint", strengths.w_inpaint),
        ] {
            if !(0.0..=1e4).contains(&v) {
                return Err(Error::Spec(format!(
                    "strengths.{name} must be a number from 0 to 10000, got {v}"
                )));
            }
        }
        let size = (image.height() as usize, image.width() as usize);
        let reference = if kind.needs_reference() {
            Some(reference.ok_or_else(|| {
                Error::Spec(format!(
                    "{} mode needs a reference image: pass --reference FILE or set \"reference\" in the spec",
                    kind.name()
                ))
            })?)
        } else {
            None
        };
        let ref_size = reference
            .as_ref()
            .map(|r| (r.height() as usize, r.width() as usize));
        let mut mask = |name: &str, what: &str, expect: (usize, usize)| -> Result<Mask> {
            let bytes = load(name)?;
            let img = crate::image::decode(&bytes)
                .map_err(|e| Error::Spec(format!("{what} ({}): {e}", short(name))))?;
            let m = Mask::from_image(&img);
            if (m.h, m.w) != expect {
                return Err(Error::Spec(format!(
                    "{what} ({}) is {}x{} but its image is {}x{}: draw the mask on the same image",
                    short(name),
                    m.w,
                    m.h,
                    expect.1,
                    expect.0
                )));
            }
            if m.is_empty() {
                return Err(Error::Spec(format!(
                    "{what} ({}) is empty: mark at least one pixel",
                    short(name)
                )));
            }
            Ok(m)
        };
        let point = |p: [f64; 2], what: &str, (h, w): (usize, usize)| -> Result<Point> {
            let ok = p.iter().all(|v| v.is_finite())
                && (0.0..w as f64).contains(&p[0])
                && (0.0..h as f64).contains(&p[1]);
            if !ok {
                return Err(Error::Spec(format!(
                    "{what} [{}, {}] is outside the {w}x{h} image",
                    p[0], p[1]
                )));
            }
            Ok(Point::new(p[0], p[1]))
        };
        let scale_in = |s: f64, (lo, hi): (f64, f64)| -> Result<f64> {
            if s.is_finite() && (lo..=hi).contains(&s) {
                Ok(s)
            } else {
                Err(Error::Spec(format!(
                    "scale must be between {lo} and {hi}, got {s}"
                )))
            }
        };
        let pairs = |points: &[PointPair]| -> Result<Vec<(Point, Point)>> {
            if points.is_empty() {
                return Err(Error::Spec(
                    "give at least one point pair {\"handle\": [x, y], \"target\": [x, y]}".into(),
                ));
            }
            points
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    Ok((
                        point(p.handle, &format!("handle of point pair {i}"), size)?,
                        point(p.target, &format!("target of point pair {i}"), size)?,
                    ))
                })
                .collect()
        };
        let mode = match &self.mode {
            ModeSpec::Move {
                mask: m,
                from,
                to,
                scale,
                reference_region,
            } => {
                let from = point(*from, "arrow start", size)?;
                let to = point(*to, "arrow end", size)?;
                Mode::Move {
                    mask: mask(m, "object mask", size)?,
                    arrow: Point::new(to.x - from.x, to.y - from.y),
                    scale: scale_in(*scale, MOVE_SCALE)?,
                    reference_region: reference_region
                        .as_deref()
                        .map(|r| mask(r, "reference region mask", size))
                        .transpose()?,
                }
            }
            ModeSpec::Appearance {
                mask: m,
                reference_mask,
                ..
            } => Mode::Appearance {
                mask: mask(m, "object mask", size)?,
                reference_mask: mask(reference_mask, "reference mask", ref_size.unwrap_or(size))?,
            },
            ModeSpec::Paste {
                reference_mask,
                offset,
                scale,
                ..
            } => {
                if !offset.iter().all(|v| v.is_finite()) {
                    return Err(Error::Spec("offset must be two finite numbers".into()));
                }
                Mode::Paste {
                    reference_mask: mask(
                        reference_mask,
                        "reference mask",
                        ref_size.unwrap_or(size),
                    )?,
                    offset: Point::new(offset[0], offset[1]),
                    scale: scale_in(*scale, PASTE_SCALE)?,
                }
            }
            ModeSpec::Drag { mask: m, points } => Mode::Drag {
                mask: mask(m, "editable-region mask", size)?,
                points: pairs(points)?,
            },
            ModeSpec::FaceLandmarks { points } => Mode::FaceLandmarks {
                points: pairs(points)?,
            },
        };
        let prompt = self
            .prompt
            .clone()
            .unwrap_or_else(|| kind.default_prompt().to_string());
        let reference_prompt = match &self.mode {
            ModeSpec::Appearance {
                reference_prompt, ..
            }
            | ModeSpec::Paste {
                reference_prompt, ..
            } => reference_prompt.clone().unwrap_or_else(|| prompt.clone()),
            _ => prompt.clone(),
        };
        Ok(Edit {
            mode,
            prompt,
            reference_prompt,
            steps: self.steps,
            seed: self.seed,
            resolution: self.resolution,
            strengths,
            image,
            reference,
        })
    }
}

/// A mask name for messages, cut short if it is long (inline data).
fn short(name: &str) -> String {
    if name.len() > 80 {
        format!("{}...", &name[..name.floor_char_boundary(60)])
    } else {
        name.to_string()
    }
}
