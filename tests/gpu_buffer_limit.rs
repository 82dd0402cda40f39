//! What the GPU's buffer limit does to an edit: a working resolution whose VAE activations
//! cannot fit in one buffer fails before any work, naming one that fits, and a tensor that
//! outgrows a buffer anyway fails with what to do instead of a driver's error chain. On
//! lavapipe (128 MiB a buffer); skipped where this machine has no Vulkan adapter.

mod common;

use std::sync::Mutex;

use burn::tensor::{DType, Device, Tensor};
use common::*;
use dragonedit::StableDiffusion;
use dragonedit::device::{max_buffer_bytes, read_back};
use dragonedit::edit::{Editor, EngineOptions};
use dragonedit::model::clip::ClipTextEncoder;
use dragonedit::model::config::ClipConfig;
use dragonedit::model::folder::{ModelSource, layout};
use dragonedit::model::random::{RandomModel, RandomSource};
use dragonedit::weights::Loader;
use pollster::block_on;

/// One test at a time on the shared device: a failed allocation carries its failure to the
/// work that needed it, and nothing else here should share in it.
static DEVICE_TURN: Mutex<()> = Mutex::new(());

/// The largest square side, a multiple of 64, whose `per_pixel` bytes a pixel fit in `limit`.
fn side_within(limit: u64, per_pixel: usize) -> usize {
    ((limit / per_pixel as u64) as f64).sqrt() as usize / 64 * 64
}

/// On a GPU, a working resolution whose VAE activations would not fit in one of the device's
/// buffers fails before the edit does anything, naming the resolution that would fit (the
/// browser would otherwise fail in the VAE after the whole inversion, with a driver's error).
#[test]
fn a_resolution_too_large_for_the_gpus_buffers_fails_at_once_naming_one_that_fits() {
    let _turn = DEVICE_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = wgpu_device() else {
        return;
    };
    let Some(limit) = max_buffer_bytes(&device) else {
        panic!("a wgpu device reports its buffer limit");
    };
    let sd = load_tiny(&device);
    let (encoder, decoder) = sd.vae.config().full_resolution_channels();
    // The side the f32 model's widest full-resolution activation fits.
    let fits = side_within(limit, encoder.max(decoder) * 4) as u32;
    let side = fits + 64;
    assert_eq!(sd.largest_square_side(4096) as u32, fits.min(4096));
    if side > 2048 {
        println!(
            "SKIPPED: this GPU's buffers ({} MiB) hold the tiny model at every resolution a spec allows",
            limit >> 20
        );
        return;
    }
    let mut e = move_edit_256();
    e.resolution = side;
    let editor = Editor::new(&sd, EngineOptions::default());
    let mut reports = 0;
    let err = block_on(editor.run(&e, None, &mut |_| {
        reports += 1;
        true
    }))
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        err.contains("in one GPU buffer") && err.contains(&format!("to {fits} or less")),
        "at {side} px: {err}"
    );
    assert_eq!(reports, 0, "the edit started before failing");
}

/// Text-to-image never encodes, so only its decoder's buffer bounds its size. In a VAE whose
/// first two blocks have the same width (neither SD 1.5's nor the tiny model's), the f32
/// encoder needs twice the f16 decoder's bytes a pixel, and must not refuse a size the
/// decoder can make.
#[test]
fn text_to_image_is_bounded_by_the_decoder_alone() {
    let _turn = DEVICE_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = wgpu_device() else {
        return;
    };
    let limit = max_buffer_bytes(&device).expect("a wgpu device reports its buffer limit");
    let mut source = RandomSource::new(RandomModel::Tiny, 0)
        .with_vae_channels(&[32, 32, 32, 32])
        .expect("a VAE config");
    let sd = StableDiffusion::load(&mut source, &device, DType::F16, &mut |_| true)
        .expect("the random model loads");
    let (encoder, decoder) = sd.vae.config().full_resolution_channels();
    // Past the f32 encoder's limit, within the f16 decoder's.
    let (side, too_large) = (
        side_within(limit, encoder * 4) + 64,
        side_within(limit, decoder * 2) + 64,
    );
    if too_large > 4096 {
        println!(
            "SKIPPED: this GPU's {} MiB buffers take any size",
            limit >> 20
        );
        return;
    }
    assert!(side < too_large);
    let refused = |side: usize| sd.check_fits((side, side)).err().map(|e| e.to_string());
    assert!(
        refused(side).is_some_and(|m| m.contains("the VAE's encoder")),
        "an edit at {side} px must be refused for the encoder's buffer"
    );
    // Cancelled at its first progress report: it started, so no buffer refused the size.
    let generate = |side: usize| {
        block_on(sd.generate("", 7, (side, side), 1, 7.5, &mut |_| false))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let started = generate(side);
    assert_eq!(started, "cancelled", "at {side} px");
    let err = generate(too_large);
    assert!(
        err.contains("the VAE's decoder needs") && err.contains("in one GPU buffer"),
        "at {too_large} px: {err}"
    );
}

/// SD 1.5's text encoder in f32 on a GPU whose buffers are smaller than its token embedding
/// (145 MiB): the table is held in blocks, and tokens from every block encode as on the CPU.
#[test]
fn a_token_table_larger_than_a_buffer_encodes_as_on_the_cpu() {
    let _turn = DEVICE_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = wgpu_device() else {
        return;
    };
    let limit = max_buffer_bytes(&device).expect("a wgpu device reports its buffer limit");
    let encoder = |device: &Device| {
        let mut source = RandomSource::new(RandomModel::Sd15, 3);
        let config = ClipConfig::parse("config", &source.read_text(layout::TEXT_CONFIG)?)?;
        let mut reader = source.open_first(layout::TEXT_WEIGHTS)?;
        let mut w = Loader::new(reader.as_mut(), device, DType::F32);
        let encoder = ClipTextEncoder::load(&config, &mut w)?;
        Ok::<_, dragonedit::error::Error>((encoder, config))
    };
    let (gpu, config) = encoder(&device).expect("loads on the GPU");
    let table = (config.vocab_size * config.hidden_size * 4) as u64;
    if table <= limit {
        println!(
            "SKIPPED: this GPU's {} MiB buffers hold the whole token table",
            limit >> 20
        );
        return;
    }
    // Two prompts' worth of ids from every block of the table, both ends included, and
    // repeats.
    let ids: Vec<Vec<u32>> = (0..2u32)
        .map(|row| {
            (0..77u32)
                .map(|i| (i * 3989 + row * 17) % config.vocab_size as u32)
                .collect()
        })
        .collect();
    assert!(
        ids[0].contains(&0)
            && ids[0]
                .iter()
                .any(|&t| t as usize >= config.vocab_size - 3989)
    );
    let (cpu, _) = encoder(&dragonedit::device::cpu()).expect("loads on the CPU");
    let on = |e: &ClipTextEncoder| values(e.forward(&ids).expect("encodes"));
    let (expected, actual) = (on(&cpu), on(&gpu));
    // Layer-normed outputs of order 1 after 12 f32 layers: the CPU and lavapipe sum in
    // different orders, a few ulps a layer.
    assert_close("text encoder, blocked table", &actual, &expected, 1e-3);
}

/// A tensor larger than one of the GPU's buffers fails with the size and what to do, not
/// cubecl's error chain, and the device goes on working.
#[test]
fn a_tensor_larger_than_a_buffer_fails_with_what_to_do_and_the_gpu_goes_on() {
    let _turn = DEVICE_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = wgpu_device() else {
        return;
    };
    let limit = max_buffer_bytes(&device).expect("a wgpu device reports its buffer limit");
    if limit > 1 << 30 {
        println!(
            "SKIPPED: this GPU's buffers hold {} MiB; the test allocates past that only up to 1 GiB",
            limit >> 20
        );
        return;
    }
    let n = (limit / 4) as usize + (1 << 20);
    let err = block_on(read_back((Tensor::<1>::ones([n], &device) + 1.0).sum()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let mib = (n * 4).div_ceil(1 << 20);
    assert!(
        err.contains(&format!("one GPU buffer of {mib} MiB"))
            && err.contains(&format!("({} MiB on this GPU)", limit >> 20))
            && err.contains("lower the working resolution")
            && !err.contains("Caused by"),
        "{err}"
    );
    let small = block_on(read_back(Tensor::<1>::ones([16], &device).sum()));
    assert_eq!(small.ok(), Some(vec![16.0]));
}
