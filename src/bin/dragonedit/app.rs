//! Command-line arguments and dispatch.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{download, run};

/// Drag-style photo editing with DragonDiffusion on Stable Diffusion 1.5.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every model-using command shares.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A local diffusers SD 1.5 folder, or a base URL to download one from (cached, resumable).
    #[arg(long)]
    pub model: String,
    /// Run on the CPU instead of the GPU (much slower).
    #[arg(long)]
    pub cpu: bool,
    /// Compute in f16 where the GPU supports it.
    #[arg(long)]
    pub f16: bool,
    /// Where downloaded models are cached.
    #[arg(long, env = "DRAGONEDIT_CACHE")]
    pub cache_dir: Option<PathBuf>,
}

/// The photo and inversion options `invert` and `reconstruct` share.
#[derive(Args, Clone)]
pub struct PhotoArgs {
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Working resolution: the image is resized to an area of about R x R.
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
}

/// Memory-bank policy on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum Bank {
    Recompute,
    Store,
}

/// How the guidance gradient is taken, on the command line.
#[derive(Clone, Copy, ValueEnum)]
pub enum Gradients {
    Flash,
    Lean,
    Recompute,
    Tape,
}

impl From<Gradients> for dragonedit::edit::GradientMemory {
    fn from(g: Gradients) -> Self {
        match g {
            Gradients::Flash => Self::Flash,
            Gradients::Lean => Self::Lean,
            Gradients::Recompute => Self::Recompute,
            Gradients::Tape => Self::Tape,
        }
    }
}

/// The `edit` command's inputs.
#[derive(Args)]
pub struct EditArgs {
    /// The photo to edit.
    #[arg(long)]
    pub image: PathBuf,
    /// The edit spec; mask paths in it are relative to its folder.
    #[arg(long)]
    pub spec: PathBuf,
    /// The second image of appearance and paste (overrides the spec's "reference").
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// The edited photo (PNG), at the photo's own size.
    #[arg(long)]
    pub out: PathBuf,
    /// Write every intermediate tensor here, in the layout of the reference fixtures.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Override the spec's working resolution R.
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Override the spec's step count.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Memory bank: recompute each entry when needed, or store all from the inversion.
    #[arg(long, value_enum, default_value_t = Bank::Recompute)]
    pub bank: Bank,
    /// Guidance gradient: run the forward once and pull back by hand from a few kept
    /// activations per step (lean), keep each UNet step's autodiff graph but recompute
    /// attention scores in the backward (flash), recompute every step in the backward, or keep
    /// burn's whole autodiff tape (gigabytes of attention scores).
    #[arg(long, value_enum, default_value_t = Gradients::Lean)]
    pub gradients: Gradients,
    /// Reproduce the official release's rounding, wrap-around and in-place quirks, to
    /// compare a trace with the reference implementation's.
    #[arg(long)]
    pub reference_quirks: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// Output width and height in pixels (multiples of 8).
        #[arg(long, default_value_t = 512)]
        width: usize,
        #[arg(long, default_value_t = 512)]
        height: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Invert a photo with DDIM and save the latents of every step as .npy.
    Invert {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        photo: PhotoArgs,
        /// Output .npy of shape [steps + 1, 1, 4, H/8, W/8].
        #[arg(long)]
        out: PathBuf,
    },
    /// Invert a photo and sample it back: a check that inversion and sampling agree.
    Reconstruct {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        photo: PhotoArgs,
        /// Guidance while sampling back (1 = none, which reconstructs most closely).
        #[arg(long, default_value_t = 1.0)]
        guidance: f32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Edit a photo as an edit spec (JSON) says: move, resize, appearance, paste, drag or
    /// face_landmarks. See the README for one example per mode.
    Edit {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        edit: EditArgs,
    },
    /// Time the engine's workloads (UNet passes, one guidance evaluation, the inversion, a
    /// whole edit per mode) and print a table with peak device memory.
    Bench(crate::bench::BenchArgs),
    /// Download a model into the cache and print its folder.
    Fetch {
        /// Base URL of a diffusers folder.
        #[arg(long)]
        url: String,
        #[arg(long, env = "DRAGONEDIT_CACHE")]
        cache_dir: Option<PathBuf>,
    },
}

pub fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate {
            model,
            prompt,
            seed,
            steps,
            guidance,
            width,
            height,
            out,
        } => run::generate(
            &model,
            &prompt,
            seed,
            steps,
            guidance,
            (height, width),
            &out,
        ),
        Command::Invert { model, photo, out } => run::invert(&model, &photo, &out),
        Command::Reconstruct {
            model,
            photo,
            guidance,
            out,
        } => run::reconstruct(&model, &photo, guidance, &out),
        Command::Edit { model, edit } => crate::edit::edit(&model, &edit),
        Command::Bench(args) => crate::bench::bench(&args),
        Command::Fetch { url, cache_dir } => {
            let dir = download::fetch_model(&url, cache_dir.as_deref())?;
            println!("{}", dir.display());
            Ok(())
        }
    }
}
