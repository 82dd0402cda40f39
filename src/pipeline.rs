//! Stable Diffusion 1.5 assembled from a model folder: prompt encoding, VAE, DDIM inversion,
//! sampling and reconstruction. The editing engine builds on these.

use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use crate::device::{max_buffer_bytes, read_back};
use crate::diffusion::{Schedule, SchedulerConfig, ddim};
use crate::error::{Error, Result};
use crate::model::clip::ClipTextEncoder;
use crate::model::config::{ClipConfig, UnetConfig, VaeConfig};
use crate::model::folder::{ModelSource, layout};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::{KvHook, Unet};
use crate::model::vae::{Vae, legacy_vae_key};
use crate::progress::{Phase, ProgressFn, report};
use crate::weights::Loader;

/// The four parts of SD 1.5 plus its noise schedule, on one device.
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder,
    pub unet: Unet,
    pub vae: Vae,
    pub schedule: Schedule,
    device: Device,
}

impl StableDiffusion {
    /// Loads every component from `source` onto `device`, computing in `dtype` (F32, or F16
    /// where the device supports it). Weights stream one tensor at a time.
    pub fn load(
        source: &mut dyn ModelSource,
        device: &Device,
        dtype: DType,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Self> {
        let mut tick = |step| report(progress, Phase::LoadingWeights, step, 3);
        let tokenizer = ClipTokenizer::from_files(
            &source.read_text(layout::VOCAB)?,
            &source.read_text(layout::MERGES)?,
        )?;
        let schedule = if source.has(layout::SCHEDULER_CONFIG) {
            Schedule::new(&SchedulerConfig::parse(
                layout::SCHEDULER_CONFIG,
                &source.read_text(layout::SCHEDULER_CONFIG)?,
            )?)?
        } else {
            Schedule::sd15()
        };
        tick(0)?;

        let clip_config =
            ClipConfig::parse(layout::TEXT_CONFIG, &source.read_text(layout::TEXT_CONFIG)?)?;
        let mut reader = source.open_first(layout::TEXT_WEIGHTS)?;
        let mut w = Loader::new(reader.as_mut(), device, dtype);
        let text_encoder = ClipTextEncoder::load(&clip_config, &mut w)?;
        w.finish(ClipTextEncoder::IGNORED_KEYS)?;
        drop(reader);
        tick(1)?;

        let vae_config =
            VaeConfig::parse(layout::VAE_CONFIG, &source.read_text(layout::VAE_CONFIG)?)?;
        let mut reader = source.open_first(layout::VAE_WEIGHTS)?;
        // Weights in the pipeline's dtype whatever `force_upcast` says: half of f32's. The
        // decoder computes in it, as the official DragonDiffusion (an f16 pipeline) does, and
        // `decode_values` runs it again in f32 where f16 overflows; the encoder computes in f32.
        let mut w = Loader::new(reader.as_mut(), device, dtype).with_alias(legacy_vae_key);
        let vae = Vae::load(&vae_config, &mut w)?;
        w.finish(&[])?;
        drop(reader);
        tick(2)?;

        let unet_config =
            UnetConfig::parse(layout::UNET_CONFIG, &source.read_text(layout::UNET_CONFIG)?)?;
        let mut reader = source.open_first(layout::UNET_WEIGHTS)?;
        let mut w = Loader::new(reader.as_mut(), device, dtype);
        let unet = Unet::load(&unet_config, &mut w)?;
        w.finish(&[])?;
        drop(reader);
        // The pages loading left empty (uploads, casts and the copies that shape parameters)
        // go back before the first edit takes its own: in the browser's one-page-per-allocation
        // pools they stayed reserved (145 MiB of SD 1.5's f16 load on lavapipe).
        crate::device::release_unused(device);
        tick(3)?;

        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            schedule,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Text embeddings `[N, 77, C]` for `prompts` (`""` is the unconditional prompt).
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor<3>> {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        self.text_encoder.forward(&ids)
    }

    /// Fails at once where the VAE's widest activation for a photo of `h` x `w` pixels
    /// (encoded, one at a time) or for the result (decoded) would not fit in one of this
    /// device's buffers, naming a working resolution that would: an edit checks this before it
    /// starts, instead of failing in the VAE after minutes, with a driver's error. The encoder
    /// computes in f32, the decoder in the VAE's dtype.
    pub fn check_fits(&self, size: (usize, usize)) -> Result<()> {
        self.encoder_fits(1, size)?;
        self.decoder_fits(self.vae.dtype(), size)
    }

    /// The largest square working resolution, a multiple of 64 up to `cap`, that
    /// [`check_fits`](Self::check_fits) lets an edit use on this device; 0 where none does.
    pub fn largest_square_side(&self, cap: usize) -> usize {
        (1..=cap / 64)
            .map(|k| k * 64)
            .take_while(|&side| self.check_fits((side, side)).is_ok())
            .last()
            .unwrap_or(0)
    }

    /// [`check_fits`](Self::check_fits) for the encoder alone, on `images` photos at once.
    fn encoder_fits(&self, images: usize, size: (usize, usize)) -> Result<()> {
        let channels = self.vae.config().full_resolution_channels().0;
        let per_pixel = images * channels * DType::F32.size();
        self.within_buffer_limit("the VAE's encoder", per_pixel, size)
    }

    /// [`check_fits`](Self::check_fits) for the decoder alone, computing in `dtype`: the VAE's
    /// own, or f32 when its f16 result overflowed.
    fn decoder_fits(&self, dtype: DType, size: (usize, usize)) -> Result<()> {
        let what = if dtype == self.vae.dtype() {
            "the VAE's decoder"
        } else {
            "the VAE's decoder in f32 (its f16 result overflowed)"
        };
        let channels = self.vae.config().full_resolution_channels().1;
        self.within_buffer_limit(what, channels * dtype.size(), size)
    }

    /// [`fits_one_buffer`] against this device's limit; the CPU has none.
    fn within_buffer_limit(
        &self,
        what: &str,
        per_pixel: usize,
        size: (usize, usize),
    ) -> Result<()> {
        max_buffer_bytes(&self.device).map_or(Ok(()), |limit| {
            fits_one_buffer(what, per_pixel, size, limit)
        })
    }

    /// Image `[B, 3, H, W]` in [-1, 1] → latent `[B, 4, H/8, W/8]`. Sides must be multiples of 8.
    pub fn encode_image(&self, image: Tensor<4>) -> Result<Tensor<4>> {
        let [b, c, h, w] = image.dims();
        let f = self.vae.config().downscale();
        if c != 3 || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(Error::InvalidInput(format!(
                "the VAE takes RGB images with sides that are multiples of {f}, got {c}x{h}x{w}"
            )));
        }
        self.encoder_fits(b, (h, w))?;
        // In f32 whatever the VAE's dtype: the latent's rounding runs through every inversion
        // and editing step (in an f16 edit of the tiny model it doubled the final latent's
        // error, 2.3e-2 → 5.7e-2), and the encoder runs once per photo, before any UNet
        // activation is held.
        Ok(self.vae.encode_in(image, DType::F32))
    }

    /// Latent → image in [0, 1], lazily, in the VAE's dtype.
    pub fn decode(&self, latent: Tensor<4>) -> Tensor<4> {
        self.vae.decode(latent)
    }

    /// Latent `[B, 4, h, w]` → the image's values in [0, 1] on the host (`[B, 3, H, W]` in
    /// order) and its size `(H, W)`, decoded again in f32 where the VAE's f16 result is not
    /// finite.
    pub async fn decode_values(&self, latent: Tensor<4>) -> Result<(Vec<f32>, (usize, usize))> {
        let [_, _, h, w] = latent.dims();
        let f = self.vae.config().downscale();
        let dtype = self.vae.dtype();
        let mut values = read_back(self.vae.decode_unclamped_in(latent.clone(), dtype)).await?;
        if !all_finite(&values) && dtype != DType::F32 {
            self.decoder_fits(DType::F32, (h * f, w * f))?;
            values = read_back(self.vae.decode_unclamped_in(latent, DType::F32)).await?;
        }
        for v in &mut values {
            *v = v.clamp(0.0, 1.0);
        }
        Ok((values, (h * f, w * f)))
    }

    /// DDIM inversion of `z0` conditioned on `context` (ALGORITHM.md §2.1).
    pub async fn invert(
        &self,
        z0: Tensor<4>,
        context: &Tensor<3>,
        steps: usize,
        hook: &mut dyn KvHook,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Tensor<4>>> {
        ddim::invert(
            &self.unet,
            &self.schedule,
            z0,
            context,
            steps,
            hook,
            progress,
        )
        .await
    }

    /// DDIM sampling with classifier-free guidance from `z_t` (at the first timestep).
    pub async fn sample(
        &self,
        z_t: Tensor<4>,
        prompt: &str,
        guidance_scale: f32,
        steps: usize,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Tensor<4>> {
        let context = self.encode_prompts(&["", prompt])?;
        ddim::sample(
            &self.unet,
            &self.schedule,
            z_t,
            &context,
            guidance_scale,
            steps,
            progress,
        )
        .await
    }

    /// Gaussian noise `[1, 4, h, w]` drawn on the host from `seed`, so the same seed gives the
    /// same start on every backend.
    pub fn noise(&self, seed: u64, latent_hw: (usize, usize)) -> Tensor<4> {
        let (h, w) = latent_hw;
        let channels = self.unet.config().in_channels;
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..channels * h * w)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let data = TensorData::new(values, [1, channels, h, w]);
        Tensor::from_data(data, &self.device)
    }

    /// Text-to-image: noise from `seed`, `steps` of guided DDIM, decode. Returns the image's
    /// values `[1, 3, H, W]` in [0, 1] (see [`decode_values`](Self::decode_values)).
    pub async fn generate(
        &self,
        prompt: &str,
        seed: u64,
        size: (usize, usize),
        steps: usize,
        guidance_scale: f32,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<f32>> {
        let f = self.vae.config().downscale();
        let (h, w) = size;
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::InvalidInput(format!(
                "image sides must be non-zero multiples of {f}, got {w}x{h}"
            )));
        }
        // The decoder alone: text-to-image never encodes, and an f16 VAE's f32 encoder can need
        // the larger buffer.
        self.decoder_fits(self.vae.dtype(), size)?;
        let z = self.noise(seed, (h / f, w / f));
        let z = self
            .sample(z, prompt, guidance_scale, steps, progress)
            .await?;
        report(progress, Phase::Decoding, 0, 1)?;
        Ok(self.decode_values(z).await?.0)
    }
}

/// Fails, naming a working resolution that would fit, where `bytes_per_pixel` for each of the
/// `h` x `w` pixels is more than one GPU buffer of `limit` bytes may hold.
fn fits_one_buffer(
    what: &str,
    bytes_per_pixel: usize,
    (h, w): (usize, usize),
    limit: u64,
) -> Result<()> {
    let per_pixel = bytes_per_pixel as u64;
    let needed = per_pixel * (h * w) as u64;
    if needed <= limit {
        return Ok(());
    }
    let side = ((limit / per_pixel) as f64).sqrt() as u64 / 64 * 64;
    let advice = if side >= 64 {
        format!("lower the working resolution to {side} or less")
    } else {
        "this GPU cannot hold this model's images".to_string()
    };
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    Err(Error::Device(format!(
        "{what} needs {:.0} MiB in one GPU buffer for a {w} x {h} image, but this GPU allows {:.0} MiB per buffer; {advice}",
        mib(needed),
        mib(limit)
    )))
}

fn all_finite(values: &[f32]) -> bool {
    values.iter().all(|v| v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn an_image_fits_one_buffer_up_to_the_limit_and_the_error_names_a_resolution_that_fits() {
        // SD 1.5's decoder: 256 channels at full resolution, 1024 bytes a pixel in f32. At
        // 512 px that is the 256 MiB buffer the H200's f32 decode measured (258 MiB there,
        // with a convolution's padding).
        assert!(fits_one_buffer("the decoder", 1024, (512, 512), 256 * MIB).is_ok());
        let err = fits_one_buffer("the decoder", 1024, (512, 512), 255 * MIB)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the decoder needs 256 MiB in one GPU buffer for a 512 x 512 image")
                && err.contains("allows 255 MiB")
                && err.contains("lower the working resolution to 448 or less"),
            "{err}"
        );
        // In f16 at 512 px: 128 MiB, WebGPU's default binding limit, which it fits exactly.
        assert!(fits_one_buffer("the decoder", 512, (512, 512), 128 * MIB).is_ok());
        // A non-square working size counts its pixels, and the advice keeps to multiples of 64.
        let err = fits_one_buffer("the decoder", 512, (768, 1024), 128 * MIB)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("384 MiB") && err.contains("1024 x 768") && err.contains("to 512 or less"),
            "{err}"
        );
        let err = fits_one_buffer("the decoder", 1024, (512, 512), MIB)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot hold"), "{err}");
    }
}
