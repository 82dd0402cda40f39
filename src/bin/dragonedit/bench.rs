//! `dragonedit bench`: times the engine's workloads on this machine's GPU (or the CPU) and
//! prints a table: median and fastest wall time over several runs after a warm-up, the
//! device pool's peak and largest single buffer (burn's pool report; both are peaks since
//! the program started, so each row includes the rows above it), and the row's own peak heap
//! above what was held before it (on `--cpu` that is the tensors' memory).

use pollster::block_on;
use std::time::Instant;

use ::image::{Rgb, RgbImage};
use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor};
use dragonedit::edit::{EditSpec, Editor, EngineOptions, GradientMemory, InversionCache, guidance};
use dragonedit::model::random::{RandomModel, RandomSource};
use dragonedit::model::unet::NoHook;
use dragonedit::{StableDiffusion, device, heap};

use crate::run::{Bar, load_dir, load_source, open_device, read_values};

/// What `bench` measures and how.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// A model folder or URL; without it, SD 1.5-sized random weights (nothing downloaded).
    #[arg(long)]
    pub model: Option<String>,
    /// Random weights in the tiny test model's configuration instead of SD 1.5's.
    #[arg(long)]
    pub tiny: bool,
    #[arg(long)]
    pub cpu: bool,
    #[arg(long)]
    pub f16: bool,
    /// Timed runs per workload, after one warm-up run.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Square image size in pixels (a multiple of 64).
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// Diffusion steps of the inversion and of each edit.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Only the UNet, guidance and inversion rows.
    #[arg(long)]
    pub skip_edits: bool,
    /// Only the rows whose name contains this text (e.g. "guidance").
    #[arg(long)]
    pub only: Option<String>,
}

struct Row {
    name: String,
    times_ms: Vec<f64>,
    peak_mib: Option<f64>,
    largest_mib: Option<f64>,
    heap_mib: f64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn pool(device: &Device) -> (Option<f64>, Option<f64>) {
    let Some(report) = device.memory_pool_report() else {
        return (None, None);
    };
    let peak: u64 = report.iter().map(|p| p.pages_peak * p.page_size).sum();
    let largest = report.iter().map(|p| p.largest_alloc).max().unwrap_or(0);
    (Some(mib(peak)), Some(mib(largest)))
}

/// Runs `f` once to warm up (kernel compilation, autotune), then `runs` times, syncing the
/// device after each. Rows that `only` leaves out are not run.
fn measure(
    name: &str,
    only: Option<&str>,
    device: &Device,
    runs: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Option<Row>> {
    if only.is_some_and(|only| !name.contains(only)) {
        return Ok(None);
    }
    eprintln!("bench: {name} (warm-up + {runs} runs)");
    let heap_base = heap::start();
    f()?;
    device
        .sync()
        .map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
    let mut times_ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (peak_mib, largest_mib) = pool(device);
    Ok(Some(Row {
        name: name.to_string(),
        times_ms,
        peak_mib,
        largest_mib,
        heap_mib: mib(heap::peak_since(heap_base) as u64),
    }))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// A synthetic photo: a gradient with a disk, and masks of the disk / a region.
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

fn disk_mask(size: u32) -> Result<Vec<u8>> {
    let c = size as f32 / 2.0;
    let m = RgbImage::from_fn(size, size, |x, y| {
        let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
        Rgb([if d < size as f32 / 6.0 { 255 } else { 0 }; 3])
    });
    Ok(dragonedit::image::encode_png(&m)?)
}

/// The edit of each mode on the synthetic scene, at `size` pixels.
fn edits(size: u32, steps: usize) -> Vec<(&'static str, String)> {
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

fn load_model(
    args: &BenchArgs,
    device: &Device,
    bar: &mut Bar,
) -> Result<(StableDiffusion, String)> {
    match &args.model {
        Some(m) => Ok((load_dir(m, None, device, args.f16, bar)?, m.clone())),
        None => {
            let (kind, name) = if args.tiny {
                (RandomModel::Tiny, "tiny test configuration, random weights")
            } else {
                (RandomModel::Sd15, "SD 1.5 configuration, random weights")
            };
            let mut source = RandomSource::new(kind, 0);
            Ok((
                load_source(&mut source, device, args.f16, bar)?,
                name.to_string(),
            ))
        }
    }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    if !args.resolution.is_multiple_of(64) || args.resolution == 0 {
        anyhow::bail!(
            "--resolution must be a non-zero multiple of 64, got {}",
            args.resolution
        );
    }
    if !(1..=1000).contains(&args.steps) {
        anyhow::bail!("--steps must be between 1 and 1000, got {}", args.steps);
    }
    let device = open_device(args.cpu)?;
    let mut bar = Bar::new();
    let (sd, model_name) = load_model(args, &device, &mut bar)?;
    drop(bar);
    let dtype = device::compute_dtype(&device, args.f16);
    let size = args.resolution;
    let (lh, lw) = (size as usize / 8, size as usize / 8);
    let runs = args.runs.max(1);
    let only = args.only.as_deref();
    let context = sd.encode_prompts(&["", ""])?;
    let cond = context.clone().narrow(0, 1, 1);
    let z = sd.noise(1, (lh, lw));
    let mut rows = Vec::new();

    // Reading one value back makes the device finish the work behind it.
    let read = |t: Tensor<4>| -> Result<()> { read_values(t.sum()).map(|_| ()) };
    rows.extend(measure(
        &format!("UNet forward, batch 1, {lh}x{lw} latent"),
        only,
        &device,
        runs,
        || read(sd.unet.forward(z.clone(), 981.0, &cond, &mut NoHook)),
    )?);
    rows.extend(measure(
        &format!("UNet forward, batch 2 (CFG), {lh}x{lw}"),
        only,
        &device,
        runs,
        || {
            let pair = Tensor::cat(vec![z.clone(), z.clone()], 0);
            read(sd.unet.forward(pair, 981.0, &context, &mut NoHook))
        },
    )?);

    let scenes = (scene(size, 0), scene(size, size / 5));
    let mask = disk_mask(size)?;
    let resolve = |json: &str| -> Result<dragonedit::edit::Edit> {
        let spec = EditSpec::from_json(json)?;
        let reference = spec.mode.kind().needs_reference().then(|| scenes.1.clone());
        Ok(spec.resolve(scenes.0.clone(), reference, &mut |_| Ok(mask.clone()))?)
    };
    let editor = Editor::new(&sd, EngineOptions::default());
    let all = edits(size, args.steps);
    let move_edit = resolve(&all[0].1)?;
    let plan = editor.plan(&move_edit)?;
    // From the least memory to the most: the pool columns are peaks since the start.
    for (memory, how) in [
        (GradientMemory::Recompute, "step recompute"),
        (GradientMemory::Flash, "flash (scores recomputed)"),
        (GradientMemory::Tape, "autodiff tape"),
    ] {
        rows.extend(measure(
            &format!("guidance: truncated UNet forward + backward (move), {how}"),
            only,
            &device,
            runs,
            || {
                let g = block_on(guidance::evaluate(
                    &sd.unet, &plan, &z, &z, 981.0, &cond, memory,
                ))?;
                read(g.guidance)
            },
        )?);
    }
    let steps = args.steps;
    rows.extend(measure(
        &format!("DDIM inversion, {steps} steps"),
        only,
        &device,
        runs,
        || {
            let latents = block_on(sd.invert(z.clone(), &cond, steps, &mut NoHook, &mut |_| true))?;
            read(latents.last().cloned().context("no latents")?)
        },
    )?);
    if !args.skip_edits {
        for (mode, json) in &all {
            let edit = resolve(json)?;
            rows.extend(measure(
                &format!("whole edit: {mode} ({steps} steps, {size} px)"),
                only,
                &device,
                runs,
                || {
                    block_on(editor.run(&edit, None, &mut |_| true))?;
                    Ok(())
                },
            )?);
        }
        // The same move edit again on the same photo: the inversion kept by the warm-up run
        // is reused, so this row against the first whole-edit row is what a second drag of one
        // photo saves.
        let mut cache = InversionCache::default();
        let second = measure(
            &format!("second edit of the same photo: move, inversion reused ({steps} steps)"),
            only,
            &device,
            runs,
            || {
                block_on(editor.run_reusing(&move_edit, &mut cache, None, &mut |_| true, None))?;
                Ok(())
            },
        )?;
        if let Some(row) = second {
            anyhow::ensure!(
                cache.hits() == runs,
                "the second edit inverted again ({} reuses in {} runs)",
                cache.hits(),
                runs
            );
            rows.push(row);
        }
    }

    println!(
        "dragonedit bench: {} on {}, {:?}, model: {model_name}, {runs} runs after a warm-up",
        if args.cpu { "CPU (flex)" } else { "GPU (wgpu)" },
        device_name(&device),
        dtype
    );
    println!();
    println!(
        "| workload | median ms | fastest ms | peak pool MiB | largest buffer MiB | peak heap MiB |"
    );
    println!("|---|---|---|---|---|---|");
    let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0}"));
    for r in &rows {
        let fastest = r.times_ms.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {:.0} |",
            r.name,
            median(&r.times_ms),
            fastest,
            fmt(r.peak_mib),
            fmt(r.largest_mib),
            r.heap_mib
        );
    }
    Ok(())
}

fn device_name(device: &Device) -> String {
    format!("{device:?}")
}
