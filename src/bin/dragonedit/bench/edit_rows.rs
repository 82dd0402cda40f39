//! The whole-edit rows: an edit of each mode on a synthetic photo, a second edit of the same
//! photo, and the wall time and pool of each phase.

use pollster::block_on;
use std::time::Instant;

use ::image::{Rgb, RgbImage};
use anyhow::Result;
use burn::tensor::Device;
use dragonedit::edit::{Edit, EditSpec, Editor, InversionCache};
use dragonedit::progress::Phase;

use super::measure::{Plan, Row, largest_buffer, measure, mib, pool_line, whole_mib};
use super::pool_sampler::{Peak, PoolSampler};

/// The synthetic photos and mask every edit row works on, at one size.
pub(super) struct Scenes {
    size: u32,
    /// The photo edited, and a second one for the modes that take a reference image.
    photo: RgbImage,
    reference: RgbImage,
    /// A disk's mask, as a PNG, for every mask an edit names.
    mask: Vec<u8>,
}

impl Scenes {
    pub(super) fn new(size: u32) -> Result<Self> {
        Ok(Self {
            size,
            photo: scene(size, 0),
            reference: scene(size, size / 5),
            mask: disk_mask(size)?,
        })
    }

    /// The edit a JSON spec of [`edits`] describes, on these photos.
    pub(super) fn resolve(&self, json: &str) -> Result<Edit> {
        let spec = EditSpec::from_json(json)?;
        let reference = spec
            .mode
            .kind()
            .needs_reference()
            .then(|| self.reference.clone());
        Ok(spec.resolve(self.photo.clone(), reference, &mut |_| {
            Ok(self.mask.clone())
        })?)
    }
}

/// A synthetic photo: a gradient with a disk.
fn scene(size: u32, shift: u32) -> RgbImage {
    let c = size as f32 / 2.0;
    RgbImage::from_fn(size, size, |x, y| {
        let d = ((x as f32 - c + shift as f32).powi(2) + (y as f32 - c).powi(2)).sqrt();
        if d < size as f32 / 6.0 {
            Rgb([200, 40, 40])
        } else {
            Rgb([(x * 255 / size) as u8, (y * 255 / size) as u8, 120])
        }
    })
}

/// A mask of the disk in the middle of [`scene`]'s photo, as a PNG.
fn disk_mask(size: u32) -> Result<Vec<u8>> {
    let c = size as f32 / 2.0;
    let m = RgbImage::from_fn(size, size, |x, y| {
        let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
        Rgb([if d < size as f32 / 6.0 { 255 } else { 0 }; 3])
    });
    Ok(dragonedit::image::encode_png(&m)?)
}

/// The edit of each mode on the synthetic scene, at `size` pixels.
pub(super) fn edits(size: u32, steps: usize) -> Vec<(&'static str, String)> {
    let s = size as f64;
    let (c, d) = (s / 2.0, s / 8.0);
    let common = format!("\"resolution\": {size}, \"steps\": {steps}");
    vec![
        (
            "move",
            format!(
                r#"{{"mode": "move", "mask": "disk", "from": [{c}, {c}], "to": [{}, {c}], {common}}}"#,
                c + d
            ),
        ),
        (
            "drag",
            format!(
                r#"{{"mode": "drag", "mask": "disk", {common},
                     "points": [{{"handle": [{c}, {c}], "target": [{}, {}]}}]}}"#,
                c + d / 2.0,
                c - d / 2.0
            ),
        ),
        (
            "face_landmarks",
            format!(
                r#"{{"mode": "face_landmarks", {common},
                     "points": [{{"handle": [{c}, {c}], "target": [{}, {c}]}},
                                {{"handle": [{d}, {d}], "target": [{d}, {}]}}]}}"#,
                c + d / 4.0,
                d * 1.5
            ),
        ),
        (
            "appearance",
            format!(
                r#"{{"mode": "appearance", "mask": "disk", "reference_mask": "disk", {common}}}"#
            ),
        ),
        (
            "paste",
            format!(
                r#"{{"mode": "paste", "reference_mask": "disk", "offset": [{}, 0], {common}}}"#,
                -d
            ),
        ),
    ]
}

/// A whole edit of each mode (`all`, from [`edits`]), each phase's wall time and pool on
/// stderr, then the move edit again on the same photo, reusing the first run's inversion and
/// reference features.
pub(super) fn edit_rows(
    editor: &Editor,
    scenes: &Scenes,
    all: &[(&str, String)],
    move_edit: &Edit,
    plan: Plan,
    device: &Device,
    steps: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (mode, json) in all {
        let edit = scenes.resolve(json)?;
        let name = format!("whole edit: {mode} ({steps} steps, {} px)", scenes.size);
        if !plan.selects(&name) {
            continue;
        }
        rows.extend(measure(&name, plan, device, || {
            let mut phases = PhaseClock::new(device, &name, plan.sampler);
            block_on(editor.run(&edit, None, &mut |p| {
                phases.reached(p.phase);
                true
            }))?;
            eprintln!("bench: {name}: {}", phases.finish());
            Ok(())
        })?);
    }
    // The same move edit again on the same photo: the first edit fills the cache, and
    // every run after it reuses that inversion and the guided steps' reference features,
    // so this row against the first whole-edit row is what a second drag of one photo
    // saves.
    let name = format!(
        "second edit of the same photo: move, inversion and reference features reused ({steps} steps)"
    );
    if plan.selects(&name) {
        let mut cache = InversionCache::default();
        let mut second = || -> Result<()> {
            block_on(editor.run_reusing(move_edit, &mut cache, None, &mut |_| true, None))?;
            Ok(())
        };
        second()?;
        rows.extend(measure(&name, plan, device, &mut second)?);
        eprintln!(
            "bench: {name}: reference features kept for the next edit: {:.1} MiB, reused by {} guided steps",
            mib(cache.feature_bytes() as u64),
            cache.feature_hits(),
        );
        let reuses = plan.warmups + plan.runs + plan.untimed_after();
        anyhow::ensure!(
            cache.hits() == reuses,
            "the second edit inverted again ({} reuses in {reuses} runs)",
            cache.hits(),
        );
    }
    Ok(rows)
}

/// Wall time per phase of one whole edit. Natively the engine lets the device's queue run
/// ahead of its progress reports, so the clock waits for the device at each change of phase:
/// a phase's time is then its own work, not the queue it inherited.
///
/// Each phase's end is also a line on stderr with the most the pool reserved during it and
/// the pool as it stands: on lavapipe a whole SD-sized edit can outlast a session, and the
/// row's own line comes only at its end.
struct PhaseClock<'a> {
    device: &'a Device,
    /// The pool's peak through the current phase, where the device has a pool.
    peak: Option<Peak>,
    /// The row's name, for the stderr lines.
    row: &'a str,
    current: Option<Phase>,
    /// When the current phase began (the clock's creation for the first).
    since: Instant,
    spent: Vec<(Phase, f64)>,
}

impl<'a> PhaseClock<'a> {
    /// The phases' peaks are kept only in the run `measure` reads the pool through, so that
    /// the timed runs are not slowed by the readings.
    fn new(device: &'a Device, row: &'a str, sampler: Option<&PoolSampler>) -> Self {
        Self {
            device,
            peak: sampler.filter(|s| s.watching()).map(PoolSampler::watch),
            row,
            current: None,
            since: Instant::now(),
            spent: Vec::new(),
        }
    }

    fn reached(&mut self, phase: Phase) {
        if self.current != Some(phase) {
            self.close();
            self.current = Some(phase);
        }
    }

    fn close(&mut self) {
        if let Some(phase) = self.current.take() {
            // A lost device shows in the edit's own next read; the clock only stops here.
            let _ = self.device.sync();
            let s = self.since.elapsed().as_secs_f64();
            self.spent.push((phase, s));
            let reserved = self.peak.as_ref().map_or(String::new(), |p| {
                format!("; reserved at most {:.0} MiB during it", mib(p.take()))
            });
            eprintln!(
                "bench: {}: {phase} took {s:.2} s{reserved}; pool now {}; largest buffer {} MiB",
                self.row,
                pool_line(self.device).unwrap_or_else(|| "n/a".to_string()),
                whole_mib(largest_buffer(self.device)),
            );
            self.since = Instant::now();
        }
    }

    /// "phase 1.20 s, phase 3.40 s, ...", in the order the phases came.
    fn finish(mut self) -> String {
        self.close();
        self.spent
            .iter()
            .map(|(phase, s)| format!("{phase} {s:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
