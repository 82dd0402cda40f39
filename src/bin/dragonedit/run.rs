//! The subcommands: load the model with a progress bar, run the engine, write the results.

use pollster::block_on;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use dragonedit::model::folder::{DirSource, ModelSource};
use dragonedit::progress::{Phase, Progress};
use dragonedit::{StableDiffusion, device, image};
use indicatif::{ProgressBar, ProgressStyle};

use crate::app::{ModelArgs, PhotoArgs};
use crate::download;

/// A terminal progress bar that follows the engine's reports, one bar per phase.
pub struct Bar {
    bar: Option<ProgressBar>,
    phase: Option<Phase>,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            bar: None,
            phase: None,
        }
    }

    pub fn report(&mut self, p: Progress) -> bool {
        if self.phase != Some(p.phase) {
            if let Some(bar) = self.bar.take() {
                bar.finish();
            }
            let bar = ProgressBar::new(p.total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>16} [{bar:40}] {pos}/{len} {elapsed} (eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(p.phase.to_string());
            self.bar = Some(bar);
            self.phase = Some(p.phase);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(p.step as u64);
        }
        true
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

pub fn open_device(cpu: bool) -> Result<Device> {
    open_device_with_pools(cpu, device::PoolLayout::Shared)
}

pub fn open_device_with_pools(cpu: bool, pools: device::PoolLayout) -> Result<Device> {
    if cpu {
        return Ok(device::cpu());
    }
    let gpu = device::gpu_with_pools(device::GraphicsApi::Native, pools)?;
    if cfg!(feature = "spirv") {
        warn_without_matrix_cores(&gpu);
    }
    Ok(gpu)
}

/// The `spirv` build is for cards whose Vulkan driver offers cooperative matrices (NVIDIA's):
/// elsewhere it gains nothing over the default build, and on Mesa's lavapipe (22.3 and 25.0)
/// cubecl 0.11.3's SPIR-V for kernels with workgroup memory crashed the driver.
fn warn_without_matrix_cores(gpu: &Device) {
    match device::kernel_language(gpu) {
        Some(language) if language.matrix_cores => {}
        Some(language) => eprintln!(
            "warning: this is the `spirv` build, but the GPU's kernels run as {} without \
             matrix cores; the default build (WGSL) is the tested one, use it if this run fails",
            language.runtime
        ),
        None => {}
    }
}

/// The local folder of `--model`: itself, or the cached download of a URL.
pub fn model_dir(model: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    if model.starts_with("http://") || model.starts_with("https://") {
        download::fetch_model(model, cache_dir)
    } else {
        Ok(PathBuf::from(model))
    }
}

/// Loads every part from `source` onto `device`, in f16 when asked and supported.
pub fn load_source(
    source: &mut dyn ModelSource,
    device: &Device,
    f16: bool,
    bar: &mut Bar,
) -> Result<StableDiffusion> {
    let dtype = device::compute_dtype(device, f16);
    Ok(StableDiffusion::load(source, device, dtype, &mut |p| {
        bar.report(p)
    })?)
}

/// Loads a model folder (or downloads it) onto the device of `--cpu`.
pub fn load_dir(
    model: &str,
    cache_dir: Option<&Path>,
    device: &Device,
    f16: bool,
    bar: &mut Bar,
) -> Result<StableDiffusion> {
    let dir = model_dir(model, cache_dir)?;
    let mut source = DirSource::new(&dir)?;
    load_source(&mut source, device, f16, bar)
        .with_context(|| format!("loading the model from {}", dir.display()))
}

pub fn load(args: &ModelArgs, bar: &mut Bar) -> Result<StableDiffusion> {
    let device = open_device(args.cpu)?;
    load_dir(
        &args.model,
        args.cache_dir.as_deref(),
        &device,
        args.f16,
        bar,
    )
}

pub fn read_values<const D: usize>(t: Tensor<D>) -> Result<(Vec<usize>, Vec<f32>)> {
    let data = t
        .try_into_data()
        .map_err(|e| anyhow::anyhow!("reading the result back from the device failed: {e:?}"))?;
    let shape = data.shape().to_vec();
    let values = data
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("unexpected result type: {e:?}"))?;
    Ok((shape, values))
}

/// Writes decoded values `[1, 3, h, w]` as a PNG.
fn write_image(values: &[f32], (h, w): (usize, usize), out: &Path) -> Result<()> {
    let img = image::image_from_values(values, h, w)?;
    let png = image::encode_png(&img)?;
    std::fs::write(out, png).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Reads and decodes a photo, naming the file in any error.
pub fn read_photo(path: &Path) -> Result<::image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    image::decode(&bytes).with_context(|| path.display().to_string())
}

fn read_image(sd: &StableDiffusion, path: &Path, resolution: u32) -> Result<Tensor<4>> {
    let img = read_photo(path)?;
    let img = image::to_working_resolution(&img, resolution);
    Ok(image::tensor_from_image(&img, sd.device()))
}

pub fn generate(
    args: &ModelArgs,
    prompt: &str,
    seed: u64,
    steps: usize,
    guidance: f32,
    size: (usize, usize),
    out: &Path,
) -> Result<()> {
    check_steps(steps)?;
    let mut bar = Bar::new();
    let sd = load(args, &mut bar)?;
    let values =
        block_on(sd.generate(prompt, seed, size, steps, guidance, &mut |p| bar.report(p)))?;
    write_image(&values, size, out)
}

fn check_steps(steps: usize) -> Result<()> {
    if !(1..=1000).contains(&steps) {
        bail!("--steps must be between 1 and 1000, got {steps}");
    }
    Ok(())
}

/// Loads, resizes and encodes the photo, then inverts it: the `steps + 1` latents.
fn inversion(sd: &StableDiffusion, photo: &PhotoArgs, bar: &mut Bar) -> Result<Vec<Tensor<4>>> {
    let x = read_image(sd, &photo.image, photo.resolution)?;
    let z0 = sd.encode_image(x)?;
    let context = sd.encode_prompts(&[&photo.prompt])?;
    let mut hook = dragonedit::model::unet::NoHook;
    Ok(block_on(sd.invert(
        z0,
        &context,
        photo.steps,
        &mut hook,
        &mut |p| bar.report(p),
    ))?)
}

pub fn invert(args: &ModelArgs, photo: &PhotoArgs, out: &Path) -> Result<()> {
    check_steps(photo.steps)?;
    let mut bar = Bar::new();
    let sd = load(args, &mut bar)?;
    let latents = inversion(&sd, photo, &mut bar)?;
    let stacked = Tensor::stack::<5>(latents, 0);
    let (shape, values) = read_values(stacked)?;
    std::fs::write(out, npy_bytes(&shape, &values)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} latents to {}", shape[0], out.display());
    Ok(())
}

pub fn reconstruct(args: &ModelArgs, photo: &PhotoArgs, guidance: f32, out: &Path) -> Result<()> {
    check_steps(photo.steps)?;
    let mut bar = Bar::new();
    let sd = load(args, &mut bar)?;
    let mut latents = inversion(&sd, photo, &mut bar)?;
    let z_t = latents.pop().context("inversion returned no latents")?;
    let z0 = block_on(
        sd.sample(z_t, &photo.prompt, guidance, photo.steps, &mut |p| {
            bar.report(p)
        }),
    )?;
    let (values, size) = block_on(sd.decode_values(z0))?;
    write_image(&values, size, out)
}

/// An `.npy` file's bytes (little-endian f32).
pub fn npy_bytes(shape: &[usize], values: &[f32]) -> Result<Vec<u8>> {
    use npyz::WriterBuilder;
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut buf = Vec::new();
    {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape)
            .writer(&mut buf)
            .begin_nd()?;
        writer.extend(values.iter().copied())?;
        writer.finish()?;
    }
    Ok(buf)
}
