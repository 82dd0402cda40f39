//! `dragonedit bench`: times the engine's workloads on this machine's GPU (or the CPU) and
//! prints a table: median and fastest wall time over several runs after a warm-up; the most
//! the device pool reserved (weights included) during one more, untimed run, read every few
//! milliseconds after free pages went back to the driver, so that a row does not carry what
//! the rows and runs before it left; the largest single allocation since the program
//! started, in every pool (the weights' buffers included); and the row's own peak heap above
//! what was held before it (on `--cpu` that is the tensors' memory).

mod edit_rows;
mod measure;
mod op_rows;
mod pool_sampler;

use pollster::block_on;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor};
use dragonedit::edit::{Editor, EngineOptions, GradientMemory, guidance};
use dragonedit::model::attention::{
    AttentionStrategy, UnetAttention, set_attention_strategy, unet_attention, uses_fused,
};
use dragonedit::model::conv::ConvStrategy;
use dragonedit::model::fixed_product::UnitRoutine;
use dragonedit::model::products::{ProductKernel, set_product_kernel, set_split_outputs};
use dragonedit::model::random::{RandomModel, RandomSource};
use dragonedit::model::unet::NoHook;
use dragonedit::{StableDiffusion, device};

use crate::app::Gradients;
use crate::run::{Bar, load_dir, load_source, open_device_with_pools, read_values};
use edit_rows::{Scenes, edit_rows, edits};
use measure::{Plan, measure};
use op_rows::{op_rows, product_rows};
use pool_sampler::PoolSampler;

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
    /// Which kernel computes the matrix products (the convolutions' and the linear layers'):
    /// tuned (burn's autotuned choice, the native default), browser (the one fixed kernel
    /// burn runs in a browser, which has no autotune), or another of the unit routines a
    /// browser could run (simple-smallest, double-largest, double-smallest: single or double
    /// buffered, with the largest or smallest tiles; the browser's is simple-largest). With
    /// --attention kernel, browser times the browser's own arithmetic on this device.
    #[arg(long, value_enum, default_value_t = ProductsArg::Tuned)]
    pub products: ProductsArg,
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
pub enum ProductsArg {
    Tuned,
    Browser,
    SimpleSmallest,
    DoubleLargest,
    DoubleSmallest,
}

impl From<ProductsArg> for ProductKernel {
    fn from(p: ProductsArg) -> Self {
        match p {
            ProductsArg::Tuned => ProductKernel::Tuned,
            ProductsArg::Browser => ProductKernel::Browser,
            ProductsArg::SimpleSmallest => ProductKernel::Unit(UnitRoutine::SimpleSmallest),
            ProductsArg::DoubleLargest => ProductKernel::Unit(UnitRoutine::DoubleLargest),
            ProductsArg::DoubleSmallest => ProductKernel::Unit(UnitRoutine::DoubleSmallest),
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
    set_product_kernel(args.products.into());
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
         products: {}, {}, {} warm-ups + {} runs ({} + {} per whole edit, guidance gradient: \
         {:?})",
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
        match ProductKernel::from(args.products) {
            ProductKernel::Tuned => "burn's tuned kernels",
            ProductKernel::Browser => "the browser's fixed kernel",
            ProductKernel::Unit(routine) => routine.name(),
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

    let scenes = Scenes::new(size)?;
    let editor = Editor::new(
        &sd,
        EngineOptions {
            gradients: args.gradients.into(),
            ..EngineOptions::default()
        },
    );
    let all = edits(size, args.steps);
    let move_edit = scenes.resolve(&all[0].1)?;
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
        rows.extend(edit_rows(
            &editor, &scenes, &all, &move_edit, edit_plan, &device, steps,
        )?);
    }
    for profile in rows.iter().filter_map(|r| r.profile.as_ref()) {
        println!("{profile}");
    }
    print!("{}", attention_choices());
    eprintln!("bench: {} rows", rows.len());
    Ok(())
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

/// The device, and natively the card, what its kernels are compiled to and whether its matrix
/// products reach the card's matrix cores, with the shapes the driver offers them in: a table
/// from the `spirv` build says so.
fn device_name(device: &Device) -> String {
    let card = device.identity().map(|id| id.name).unwrap_or_default();
    match dragonedit::device::kernel_language(device) {
        Some(language) => format!(
            "{device:?} ({card}; kernels: {}, matrix cores: {})",
            language.runtime,
            if language.matrix_cores {
                format!("yes: {}", language.matrix_shapes.join("; "))
            } else {
                "no".to_string()
            }
        ),
        None => format!("{device:?}"),
    }
}
