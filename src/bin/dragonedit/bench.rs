//! `dragonedit bench`: times the engine's workloads on this machine's GPU (or the CPU) and
//! prints a table: median and fastest wall time over several runs after a warm-up; the most
//! the device pool reserved while the timed runs ran (read every few milliseconds, weights
//! included; free pages go back to the driver before each row, so a row does not carry the
//! ones above it); the largest single buffer (burn's pool report, since the program started,
//! only the pages the activations share); and the row's own peak heap above what was held
//! before it (on `--cpu` that is the tensors' memory).

use pollster::block_on;
use std::time::Instant;

use ::image::{Rgb, RgbImage};
use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor};
use dragonedit::edit::{EditSpec, Editor, EngineOptions, GradientMemory, InversionCache, guidance};
use dragonedit::model::attention::{
    AttentionStrategy, UnetAttention, set_attention_strategy, unet_attention, uses_fused,
};
use dragonedit::model::conv::ConvStrategy;
use dragonedit::model::flash_attention::runs_as_kernels;
use dragonedit::model::products::set_split_outputs;
use dragonedit::model::random::{RandomModel, RandomSource};
use dragonedit::model::unet::NoHook;
use dragonedit::progress::Phase;
use dragonedit::{StableDiffusion, device, heap, launches};

use crate::app::Gradients;
use crate::pool_sampler::{Peak, PoolSampler};
use crate::run::{Bar, load_dir, load_source, open_device_with_pools, read_values};

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
    /// Timed runs per workload, after the warm-ups.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Untimed runs before the timed ones (kernel compilation, autotune).
    #[arg(long, default_value_t = 1)]
    pub warmups: usize,
    /// Timed runs of each whole edit [default: --runs].
    #[arg(long)]
    pub edit_runs: Option<usize>,
    /// Warm-ups of each whole edit [default: --warmups]. 0 is fair after the other rows ran in
    /// the same process: an edit runs the kernels they compiled, except the VAE's.
    #[arg(long)]
    pub edit_warmups: Option<usize>,
    /// How attention without gradients is computed: auto (on a GPU burn's fused op, and in
    /// the UNet it or our flash kernel, whichever the first call of each shape times faster;
    /// score chunks on the CPU), chunked, fused, or kernel (the UNet's by our flash kernel, as
    /// in the browser, the rest in chunks). On a GPU the guidance's attention pull-backs always
    /// run as our kernels.
    #[arg(long, value_enum, default_value_t = AttentionArg::Auto)]
    pub attention: AttentionArg,
    /// How stride-1 convolutions are computed: auto (im2col + matmul on a GPU, burn's
    /// convolution on the CPU), direct (burn's convolution) or gemm (im2col + matmul).
    #[arg(long, value_enum, default_value_t = ConvArg::Auto)]
    pub conv: ConvArg,
    /// Matrix products with fewer output elements than this (over the batch) are cut into up
    /// to 8 parts along their shared axis and the parts' outputs summed (split-K); 0 cuts none.
    /// The "op: product" rows (run when --only names them) time the UNet's products in each
    /// number of parts regardless, and with a threshold the UNet passes run once more whole.
    #[arg(long, default_value_t = 0)]
    pub split_outputs: usize,
    /// Square image size in pixels (a multiple of 64).
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    /// Diffusion steps of the inversion and of each edit.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// The GPU memory pool's layout: shared (the native default: allocations carved out of
    /// shared pages) or exclusive (one page per allocation, in size buckets, as in the browser).
    #[arg(long, value_enum, default_value_t = PoolsArg::Shared)]
    pub pools: PoolsArg,
    /// How the whole edits take the guidance gradient (the guidance rows run every way).
    #[arg(long, value_enum, default_value_t = Gradients::Lean)]
    pub gradients: Gradients,
    /// Only the UNet, guidance and inversion rows.
    #[arg(long)]
    pub skip_edits: bool,
    /// Only the rows whose name contains one of these comma-separated texts (e.g.
    /// "guidance" or "op:,UNet").
    #[arg(long)]
    pub only: Option<String>,
    /// After its timed runs, each row but the whole edits runs once more with every GPU
    /// kernel launch counted and timed on the device; the kernels that took the most time are
    /// printed after the table.
    #[arg(long)]
    pub profile: bool,
    /// Skips the untimed run after each row's timed ones that reads the pool's peak (the
    /// peak column then says n/a): for runs that only compare times.
    #[arg(long)]
    pub no_peak: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PoolsArg {
    Shared,
    Exclusive,
}

impl From<PoolsArg> for device::PoolLayout {
    fn from(p: PoolsArg) -> Self {
        match p {
            PoolsArg::Shared => Self::Shared,
            PoolsArg::Exclusive => Self::Exclusive,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ConvArg {
    Auto,
    Direct,
    Gemm,
}

impl From<ConvArg> for ConvStrategy {
    fn from(c: ConvArg) -> Self {
        match c {
            ConvArg::Auto => ConvStrategy::Auto,
            ConvArg::Direct => ConvStrategy::Direct,
            ConvArg::Gemm => ConvStrategy::Gemm,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AttentionArg {
    Auto,
    Chunked,
    Fused,
    Kernel,
}

impl From<AttentionArg> for AttentionStrategy {
    fn from(a: AttentionArg) -> Self {
        match a {
            AttentionArg::Auto => AttentionStrategy::Auto,
            AttentionArg::Chunked => AttentionStrategy::Chunked,
            AttentionArg::Fused => AttentionStrategy::Fused,
            AttentionArg::Kernel => AttentionStrategy::Kernel,
        }
    }
}

/// How many untimed and timed runs a row gets, and which rows run at all.
#[derive(Clone, Copy)]
struct Plan<'a> {
    only: Option<&'a str>,
    /// Reads the pool's reservation, where the device has a pool.
    sampler: Option<&'a PoolSampler>,
    warmups: usize,
    runs: usize,
    profile: bool,
}

impl Plan<'_> {
    /// The runs `measure` makes after the timed ones: one for the pool's peak where the device
    /// has a pool, one more for `--profile`.
    fn untimed_after(&self) -> usize {
        usize::from(self.sampler.is_some()) + usize::from(self.profile)
    }

    fn selects(&self, name: &str) -> bool {
        self.only.is_none_or(|only| {
            only.split(',')
                .map(str::trim)
                .any(|part| !part.is_empty() && name.contains(part))
        })
    }
}

struct Row {
    name: String,
    times_ms: Vec<f64>,
    peak_mib: Option<f64>,
    largest_mib: Option<f64>,
    heap_mib: f64,
    /// `--profile`'s table for this row.
    profile: Option<String>,
}

/// Kernels listed by name in a profile; the rest are summed in one line.
const PROFILE_TOP: usize = 25;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Whole MiB, or "n/a" where the pool does not say.
fn whole_mib(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.0}"))
}

/// The pool as a line for stderr: what live tensors use and what is reserved now, and each
/// pool's page size with its pages held now and at most. Printed before and after each row,
/// it tells a row's own reservation from what earlier rows and the weights left.
fn pool_line(device: &Device) -> Option<String> {
    let usage = device.memory_pool_usage()?;
    let pages: Vec<String> = device
        .memory_pool_report()?
        .iter()
        .filter(|p| p.pages_peak > 0)
        .map(|p| {
            format!(
                "{} x {:.1} MiB (peak {})",
                p.pages,
                mib(p.page_size),
                p.pages_peak
            )
        })
        .collect();
    let pages = if pages.is_empty() {
        String::new()
    } else {
        format!("; pages: {}", pages.join(", "))
    };
    Some(format!(
        "in use {:.0} MiB, reserved {:.0} MiB{pages}",
        mib(usage.bytes_in_use),
        mib(usage.bytes_reserved),
    ))
}

/// The largest allocation the shared pages ever served; `None` where the device has none (the
/// CPU) or its report lists no sliced pools (the browser's layout, `--pools exclusive`).
fn largest_buffer(device: &Device) -> Option<f64> {
    let report = device.memory_pool_report()?;
    report.iter().map(|p| mib(p.largest_alloc)).reduce(f64::max)
}

/// Runs `f` to warm up (kernel compilation, autotune), then `runs` times, syncing the device
/// after each, and prints the row at once (so a run stopped by a time limit keeps the rows it
/// finished). Rows that the plan leaves out are not run.
fn measure(
    name: &str,
    plan: Plan,
    device: &Device,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Option<Row>> {
    if !plan.selects(name) {
        return Ok(None);
    }
    let Plan { warmups, runs, .. } = plan;
    eprintln!("bench: {name} ({warmups} warm-ups + {runs} runs)");
    let sync = || {
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device error: {e:?}"))
    };
    // Free pages that earlier rows left go back: the "pool before" line is then the weights
    // and what is cached between edits.
    sync()?;
    device::release_unused(device);
    if let Some(line) = pool_line(device) {
        eprintln!("bench: {name}: pool before: {line}");
    }
    let heap_base = heap::start();
    let warm = Instant::now();
    for _ in 0..warmups {
        f()?;
        sync()?;
    }
    if warmups > 0 {
        // The first run compiles the row's kernels and autotunes its products: on a fresh
        // H200 process that, not the timed runs, took most of the time.
        eprintln!(
            "bench: {name}: warm-ups took {:.1} s",
            warm.elapsed().as_secs_f64()
        );
    }
    let mut times_ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        sync()?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // The peak comes from one more, untimed run: reading the pool while the timed runs ran
    // slowed them (see `pool_sampler`). Free pages go back first, so the peak is what one run
    // needs above the weights, not what the runs before it (autotune's candidates among them)
    // left reserved.
    let peak_mib = match plan.sampler {
        Some(sampler) => {
            sync()?;
            device::release_unused(device);
            let (peak, before) = (sampler.watch(), sampler.readings());
            let t0 = Instant::now();
            f()?;
            sync()?;
            // A run of a few readings may have missed its peak.
            eprintln!(
                "bench: {name}: the peak's untimed run took {:.1} ms, the pool read {} times",
                t0.elapsed().as_secs_f64() * 1e3,
                sampler.readings() - before,
            );
            Some(mib(peak.take()))
        }
        None => None,
    };
    let largest_mib = largest_buffer(device);
    let heap_mib = mib(heap::peak_since(heap_base) as u64);
    if let Some(line) = pool_line(device) {
        eprintln!("bench: {name}: pool after: {line}");
    }
    let profile = if plan.profile {
        let p = block_on(launches::profile(true, &mut f, sync))?;
        let table = launches::table(name, &p, PROFILE_TOP);
        // Also now, on stderr: the tables on stdout come after the last row, which a time
        // limit may never let come.
        eprintln!("{table}");
        Some(table)
    } else {
        None
    };
    let row = Row {
        name: name.to_string(),
        times_ms,
        peak_mib,
        largest_mib,
        heap_mib,
        profile,
    };
    print_row(&row);
    Ok(Some(row))
}

fn print_row(r: &Row) {
    use std::io::Write;
    let fastest = r.times_ms.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "| {} | {:.1} | {:.1} | {} | {} | {:.0} |",
        r.name,
        median(&r.times_ms),
        fastest,
        whole_mib(r.peak_mib),
        whole_mib(r.largest_mib),
        r.heap_mib
    );
    // stdout is a pipe under the GPU script's `timeout`: flush each row as it lands.
    let _ = std::io::stdout().flush();
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
    if args.profile && args.cpu {
        eprintln!("bench: --profile counts GPU kernel launches; with --cpu it is ignored");
    }
    dragonedit::model::conv::set_conv_strategy(args.conv.into());
    set_attention_strategy(args.attention.into());
    set_split_outputs(args.split_outputs);
    let device = open_device_with_pools(args.cpu, args.pools.into())?;
    let mut bar = Bar::new();
    let (sd, model_name) = load_model(args, &device, &mut bar)?;
    drop(bar);
    let dtype = device::compute_dtype(&device, args.f16);
    let size = args.resolution;
    let (lh, lw) = (size as usize / 8, size as usize / 8);
    // The reading thread runs until the bench ends.
    let sampler = if args.no_peak {
        None
    } else {
        PoolSampler::start(&device)
    };
    let plan = Plan {
        only: args.only.as_deref(),
        sampler: sampler.as_ref(),
        warmups: args.warmups,
        runs: args.runs.max(1),
        profile: args.profile && !args.cpu,
    };
    let edit_plan = Plan {
        warmups: args.edit_warmups.unwrap_or(plan.warmups),
        runs: args.edit_runs.unwrap_or(plan.runs).max(1),
        profile: false,
        ..plan
    };
    let context = sd.encode_prompts(&["", ""])?;
    let cond = context.clone().narrow(0, 1, 1);
    let z = sd.noise(1, (lh, lw));
    println!(
        "dragonedit bench: {} on {}, {:?}, model: {model_name}, convolutions: {}, attention: {}, \
         products: {}, {} warm-ups + {} runs ({} + {} per whole edit, guidance gradient: {:?})",
        match (args.cpu, args.pools) {
            (true, _) => "CPU (flex)",
            (false, PoolsArg::Shared) => "GPU (wgpu)",
            (false, PoolsArg::Exclusive) => "GPU (wgpu, one page per allocation)",
        },
        device_name(&device),
        dtype,
        if dragonedit::model::conv::uses_gemm(&device) {
            "im2col + matmul"
        } else {
            "burn's conv2d"
        },
        match (unet_attention(&device, 40), uses_fused(&z)) {
            (UnetAttention::Kernel, _) => "our flash kernel in the UNet, score chunks elsewhere",
            (UnetAttention::Timed, _) => {
                "score chunks; in the UNet burn's fused op or our flash kernel, whichever times faster per shape"
            }
            (UnetAttention::Composed, true) => "burn's fused op",
            (UnetAttention::Composed, false) => "score chunks",
        },
        match args.split_outputs {
            0 => "whole".to_string(),
            n => format!("split below {n} outputs"),
        },
        plan.warmups,
        plan.runs,
        edit_plan.warmups,
        edit_plan.runs,
        GradientMemory::from(args.gradients),
    );
    println!();
    println!(
        "| workload | median ms | fastest ms | peak reserved MiB | largest buffer MiB | peak heap MiB |"
    );
    println!("|---|---|---|---|---|---|");

    let mut rows = Vec::new();

    // Reading one value back makes the device finish the work behind it.
    let read = |t: Tensor<4>| -> Result<()> { read_values(t.sum()).map(|_| ()) };
    rows.extend(op_rows(plan, &device, dtype, (lh, lw), read)?);
    rows.extend(product_rows(plan, &device, dtype, (lh, lw), read)?);
    rows.extend(measure(
        &format!("UNet forward, batch 1, {lh}x{lw} latent"),
        plan,
        &device,
        || read(sd.unet.forward(z.clone(), 981.0, &cond, &mut NoHook)),
    )?);
    if uses_fused(&z) || unet_attention(&device, 40) == UnetAttention::Timed {
        // The same pass each way, for each one's share: score chunks (the CPU's), burn's fused
        // op alone, our flash kernel alone (the browser's).
        for (strategy, way) in [
            (AttentionStrategy::Chunked, "attention in score chunks"),
            (AttentionStrategy::Fused, "attention by burn's fused op"),
            (AttentionStrategy::Kernel, "attention by our flash kernel"),
        ] {
            set_attention_strategy(strategy);
            let row = measure(
                &format!("UNet forward, batch 1, {lh}x{lw} latent, {way}"),
                plan,
                &device,
                || read(sd.unet.forward(z.clone(), 981.0, &cond, &mut NoHook)),
            );
            set_attention_strategy(args.attention.into());
            rows.extend(row?);
        }
    }
    rows.extend(measure(
        &format!("UNet forward, batch 2 (CFG), {lh}x{lw}"),
        plan,
        &device,
        || {
            let pair = Tensor::cat(vec![z.clone(), z.clone()], 0);
            read(sd.unet.forward(pair, 981.0, &context, &mut NoHook))
        },
    )?);
    if args.split_outputs > 0 {
        // The same passes with every product whole, for what the split gains in a pass.
        set_split_outputs(0);
        let pair = Tensor::cat(vec![z.clone(), z.clone()], 0);
        for (batch, x, context) in [(1, &z, &cond), (2, &pair, &context)] {
            rows.extend(measure(
                &format!("UNet forward, batch {batch}, {lh}x{lw} latent, products whole"),
                plan,
                &device,
                || read(sd.unet.forward(x.clone(), 981.0, context, &mut NoHook)),
            )?);
        }
        set_split_outputs(args.split_outputs);
    }
    // Every UNet shape has been timed by now; stdout repeats the table after the last row,
    // which a time limit may never let come.
    eprint!("{}", attention_choices());

    let image = Tensor::<4>::random(
        [1, 3, size as usize, size as usize],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    )
    .cast(dtype);
    rows.extend(measure(
        &format!("VAE encode, {size} px"),
        plan,
        &device,
        || read(sd.encode_image(image.clone())?),
    )?);
    rows.extend(measure(
        &format!("VAE decode, {size} px"),
        plan,
        &device,
        || read(sd.decode(z.clone())),
    )?);

    let scenes = (scene(size, 0), scene(size, size / 5));
    let mask = disk_mask(size)?;
    let resolve = |json: &str| -> Result<dragonedit::edit::Edit> {
        let spec = EditSpec::from_json(json)?;
        let reference = spec.mode.kind().needs_reference().then(|| scenes.1.clone());
        Ok(spec.resolve(scenes.0.clone(), reference, &mut |_| Ok(mask.clone()))?)
    };
    let editor = Editor::new(
        &sd,
        EngineOptions {
            gradients: args.gradients.into(),
            ..EngineOptions::default()
        },
    );
    let all = edits(size, args.steps);
    let move_edit = resolve(&all[0].1)?;
    let move_plan = editor.plan(&move_edit)?;
    // From the least memory to the most: the largest-buffer column is a peak since the start.
    for (memory, how) in [
        (GradientMemory::Recompute, "step recompute"),
        (GradientMemory::Lean, "lean (hand-written pull-backs)"),
        (GradientMemory::Flash, "flash (scores recomputed)"),
        (GradientMemory::Tape, "autodiff tape"),
    ] {
        rows.extend(measure(
            &format!("guidance: truncated UNet forward + backward (move), {how}"),
            plan,
            &device,
            || {
                let g = block_on(guidance::evaluate(
                    &sd.unet, &move_plan, &z, &z, 981.0, &cond, memory,
                ))?;
                read(g.guidance)
            },
        )?);
    }
    let steps = args.steps;
    rows.extend(measure(
        &format!("DDIM inversion, {steps} steps"),
        plan,
        &device,
        || {
            let latents = block_on(sd.invert(z.clone(), &cond, steps, &mut NoHook, &mut |_| true))?;
            read(latents.last().cloned().context("no latents")?)
        },
    )?);
    if !args.skip_edits {
        for (mode, json) in &all {
            let edit = resolve(json)?;
            let name = format!("whole edit: {mode} ({steps} steps, {size} px)");
            if !edit_plan.selects(&name) {
                continue;
            }
            rows.extend(measure(&name, edit_plan, &device, || {
                let mut phases = PhaseClock::new(&device, &name, edit_plan.sampler);
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
        if edit_plan.selects(&name) {
            let mut cache = InversionCache::default();
            let mut second = || -> Result<()> {
                block_on(editor.run_reusing(&move_edit, &mut cache, None, &mut |_| true, None))?;
                Ok(())
            };
            second()?;
            rows.extend(measure(&name, edit_plan, &device, &mut second)?);
            eprintln!(
                "bench: {name}: reference features kept for the next edit: {:.1} MiB, reused by {} guided steps",
                mib(cache.feature_bytes() as u64),
                cache.feature_hits(),
            );
            let reuses = edit_plan.warmups + edit_plan.runs + edit_plan.untimed_after();
            anyhow::ensure!(
                cache.hits() == reuses,
                "the second edit inverted again ({} reuses in {reuses} runs)",
                cache.hits(),
            );
        }
    }
    for profile in rows.iter().filter_map(|r| r.profile.as_ref()) {
        println!("{profile}");
    }
    print!("{}", attention_choices());
    eprintln!("bench: {} rows", rows.len());
    Ok(())
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

/// What `--attention auto` timed on this device for the UNet's attention, shape by shape, as
/// a table (empty when nothing was timed).
fn attention_choices() -> String {
    use std::fmt::Write;
    let timed = dragonedit::model::attention_choice::timed();
    if timed.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n#### attention timed per shape (`--attention auto`: the faster way is kept)\n\n\
         | batch x heads x queries x keys x head width | dtype | burn's fused op ms | our kernel ms | fused op's error | kernel's error | kept |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (shape, t) in timed {
        // Writing into a String cannot fail.
        let _ = writeln!(
            s,
            "| {} x {} x {} x {} x {} | {:?} | {:.2} | {:.2} | {:.1e} | {:.1e} | {} |",
            shape.batch,
            shape.heads,
            shape.queries,
            shape.keys,
            shape.head_width,
            shape.dtype,
            t.fused_ms,
            t.kernel_ms,
            t.fused_error,
            t.kernel_error,
            if t.kernel_wins() { "kernel" } else { "fused" },
        );
    }
    s
}

/// Single operations at SD 1.5's shapes for this resolution, batch 2 (CFG): the two ways of
/// convolving and the attention core, to show what the UNet's time is made of.
fn op_rows(
    plan: Plan,
    device: &Device,
    dtype: burn::tensor::DType,
    (lh, lw): (usize, usize),
    read: impl Fn(Tensor<4>) -> Result<()>,
) -> Result<Vec<Row>> {
    use burn::tensor::{DType, Distribution};
    use dragonedit::model::attention::{AttentionPlan, attend_fused};
    use dragonedit::model::conv::{Conv2d, ConvSpec};

    let names = [
        format!("op: conv3x3 320->320, [2,320,{lh},{lw}], burn's conv2d"),
        format!("op: conv3x3 320->320, [2,320,{lh},{lw}], im2col + matmul"),
        format!("op: attention core, [2,8,{},40], score chunks", lh * lw),
        format!("op: attention core, [2,8,{},40], burn's fused op", lh * lw),
        format!(
            "op: attention core, [2,8,{},40], flash kernel of our own",
            lh * lw
        ),
        format!(
            "op: attention pull-back, 2 rows of [1,8,{},40], score chunks",
            lh * lw
        ),
        format!(
            "op: attention pull-back, 2 rows of [1,8,{},40], kernels of our own",
            lh * lw
        ),
    ];
    if !names.iter().any(|n| plan.selects(n)) {
        return Ok(Vec::new());
    }
    let random = |shape: [usize; 4]| {
        Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let x = random([2, 320, lh, lw]);
    let w = random([320, 320, 3, 3]).mul_scalar(0.02);
    let direct = Conv2d::new(w.clone(), None, ConvSpec::k3(320, 320), false);
    let gemm = Conv2d::new(w, None, ConvSpec::k3(320, 320), true);
    let (q, k, v) = (
        random([2, 8, lh * lw, 40]),
        random([2, 8, lh * lw, 40]),
        random([2, 8, lh * lw, 40]),
    );
    let mut rows = Vec::new();
    rows.extend(measure(&names[0], plan, device, || {
        read(direct.forward(x.clone()))
    })?);
    rows.extend(measure(&names[1], plan, device, || {
        read(gemm.forward(x.clone()))
    })?);
    let attention = AttentionPlan::default();
    rows.extend(measure(&names[2], plan, device, || {
        read(attention.attend_chunked(q.clone(), k.clone(), v.clone(), false))
    })?);
    rows.extend(measure(&names[3], plan, device, || {
        read(attend_fused(q.clone(), k.clone(), v.clone()))
    })?);
    // The fast paths against the plain ones on this device (parity tests run on lavapipe only).
    let relative = |a: Tensor<4>, b: Tensor<4>| -> Result<f32> {
        let diff = read_values((a - b.clone()).cast(DType::F32).powi_scalar(2).sum())?.1;
        let norm = read_values(b.cast(DType::F32).powi_scalar(2).sum())?.1;
        Ok((diff[0] / norm[0].max(f32::MIN_POSITIVE)).sqrt())
    };
    eprintln!(
        "bench: check: im2col + matmul against burn's conv2d, relative error {:.2e}; \
         fused attention against score chunks, {:.2e}",
        relative(gemm.forward(x.clone()), direct.forward(x))?,
        relative(
            attend_fused(q.clone(), k.clone(), v.clone()),
            attention.attend_chunked(q.clone(), k.clone(), v.clone(), false)
        )?,
    );
    if runs_as_kernels(device, 40) {
        rows.extend(kernel_rows(&names[4..], plan, device, [q, k, v], &read)?);
    }
    Ok(rows)
}

/// The UNet's matrix products at each of its four resolutions, whole and cut into 2, 4 and 8
/// parts along their shared axis (split-K): a 3x3 convolution's im2col product (`[1, out, 9 ·
/// in] x [2, 9 · in, h · w]`) and the feed-forward's second linear layer (`[2, h · w, 4 · c] x
/// [1, 4 · c, c]`), batch 2: what `--split-outputs` should be on this device. 32 rows, so they
/// run only when `--only` names them.
fn product_rows(
    plan: Plan,
    device: &Device,
    dtype: burn::tensor::DType,
    (lh, lw): (usize, usize),
    read: impl Fn(Tensor<4>) -> Result<()>,
) -> Result<Vec<Row>> {
    use burn::tensor::Distribution;
    use dragonedit::model::products::matmul_in_parts;

    if plan.only.is_none() {
        return Ok(Vec::new());
    }
    let random = |shape: [usize; 3]| {
        Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let mut rows = Vec::new();
    for (level, c) in [320, 640, 1280, 1280].into_iter().enumerate() {
        let (h, w) = (lh >> level, lw >> level);
        let n = h * w;
        if n == 0 {
            break;
        }
        let products = [
            (
                format!("conv3x3 {c}->{c} at {h}x{w}"),
                [1, c, 9 * c],
                [2, 9 * c, n],
            ),
            (
                format!("feed-forward out {}->{c} at {h}x{w}", 4 * c),
                [2, n, 4 * c],
                [1, 4 * c, c],
            ),
        ];
        for (what, a_shape, b_shape) in products {
            let [_, rows_a, inner] = a_shape;
            let cols_b = b_shape[2];
            // Batch 2, a multiply-add two operations.
            let flops = 4.0 * (rows_a * inner * cols_b) as f64;
            for parts in [1, 2, 4, 8] {
                // No commas: `--only` splits on them.
                let name = format!(
                    "op: product {rows_a}x{inner} by {inner}x{cols_b}, batch 2 ({what}), {}",
                    match parts {
                        1 => "whole".to_string(),
                        p => format!("{p} parts"),
                    }
                );
                if !plan.selects(&name) {
                    continue;
                }
                let (a, b) = (random(a_shape), random(b_shape));
                let row = measure(&name, plan, device, || {
                    read(matmul_in_parts(a.clone(), b.clone(), parts).unsqueeze())
                })?;
                if let Some(r) = &row {
                    eprintln!(
                        "bench: {name}: {:.2} TFLOP/s",
                        flops / (median(&r.times_ms) * 1e-3) / 1e12
                    );
                }
                rows.extend(row);
            }
        }
    }
    Ok(rows)
}

/// The attention kernels of our own against score chunks, forward and pull-back, with the
/// guidance's two cotangent rows per kept row, as `op_rows` lays out its attention inputs.
fn kernel_rows(
    names: &[String],
    plan: Plan,
    device: &Device,
    [q, k, v]: [Tensor<4>; 3],
    read: &impl Fn(Tensor<4>) -> Result<()>,
) -> Result<Vec<Row>> {
    use dragonedit::model::attention::AttentionPlan;
    use dragonedit::model::flash_attention::{attention_pull_back, flash_attention};

    let heads = q.dims()[1];
    let [qt, kt, vt] = [&q, &k, &v].map(tokens_of);
    let attention = AttentionPlan::default();
    let mut rows = Vec::new();
    rows.extend(measure(&names[0], plan, device, || {
        read(flash_attention(qt.clone(), kt.clone(), vt.clone(), heads).unsqueeze())
    })?);
    // One kept row (the lean guidance's), two cotangent rows (its two energies).
    let one = |t: &Tensor<4>| t.clone().narrow(0, 0, 1);
    let (q1, k1, v1) = (one(&q), one(&k), one(&v));
    let o1 = attention.attend_chunked(q1.clone(), k1.clone(), v1.clone(), false);
    let g = Tensor::cat(vec![o1.clone(), o1.clone().mul_scalar(-0.5)], 0);
    rows.extend(measure(&names[1], plan, device, || {
        let (gq, gk, gv) =
            attention.attend_pullback(q1.clone(), k1.clone(), v1.clone(), o1.clone(), g.clone());
        read((gq.sum() + gk.sum() + gv.sum()).reshape([1, 1, 1, 1]))
    })?);
    let [q1t, k1t, v1t, o1t, gt] = [&q1, &k1, &v1, &o1, &g].map(tokens_of);
    rows.extend(measure(&names[2], plan, device, || {
        let out = attention_pull_back(
            q1t.clone(),
            k1t.clone(),
            v1t.clone(),
            o1t.clone(),
            gt.clone(),
            heads,
            true,
        );
        read(out)
    })?);
    Ok(rows)
}

/// `[b, heads, n, d]` as tokens `[b, n, heads · d]`.
fn tokens_of(t: &Tensor<4>) -> Tensor<3> {
    let [b, heads, n, d] = t.dims();
    t.clone().swap_dims(1, 2).reshape([b, n, heads * d])
}

/// The device, and natively the card, what its kernels are compiled to and whether its matrix
/// products reach the card's matrix cores: a table from the `spirv` build says so.
fn device_name(device: &Device) -> String {
    let card = device.identity().map(|id| id.name).unwrap_or_default();
    match dragonedit::device::kernel_language(device) {
        Some(language) => format!(
            "{device:?} ({card}; kernels: {}, matrix cores: {})",
            language.runtime,
            if language.matrix_cores { "yes" } else { "no" }
        ),
        None => format!("{device:?}"),
    }
}
