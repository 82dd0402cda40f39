//! Parity against stock diffusers and transformers (versions in
//! tests/fixtures/diffusers/versions.json), from goldens written by
//! tests/reference/make_goldens.py. The official-code fixtures (tests/parity.rs) pin diffusers
//! 0.18; these add current releases, a wider tokenizer prompt set, a non-square latent,
//! DDIMScheduler sampling with CFG, other step counts and a BK-SDM-shaped UNet.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{DType, Device, Tensor};
use common::{assert_close, fixtures, load_tiny, npz, values, wgpu_device};
use dragonedit::StableDiffusion;
use dragonedit::model::config::UnetConfig;
use dragonedit::model::folder::{DirSource, ModelSource, layout};
use dragonedit::model::tokenizer::ClipTokenizer;
use dragonedit::model::unet::{NoHook, Unet};
use dragonedit::weights::Loader;
use pollster::block_on;

/// f32 on the CPU: single UNet passes land near 1e-6, so 1e-4 leaves room for summation order.
const CPU_TOL: f32 = 1e-4;
/// wgpu reorders reductions and uses its own conv and attention kernels.
const GPU_TOL: f32 = 1e-3;

const GOLDENS: &str = "diffusers";

fn golden(member_file: &str, member: &str) -> common::Array {
    npz(GOLDENS, member_file, member)
}

fn read_json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let text = std::fs::read_to_string(fixtures().join(GOLDENS).join(name)).expect("golden json");
    serde_json::from_str(&text).expect("valid golden json")
}

/// The tiny model with `tests/fixtures/tiny-bk`'s UNet (BK-SDM-Tiny topology).
fn load_bk_unet(device: &Device) -> Unet {
    let mut source = DirSource::new(fixtures().join("tiny-bk")).expect("tiny-bk folder");
    let config = UnetConfig::parse(
        layout::UNET_CONFIG,
        &source.read_text(layout::UNET_CONFIG).expect("config"),
    )
    .expect("BK config parses");
    let mut reader = source.open_first(layout::UNET_WEIGHTS).expect("weights");
    let mut w = Loader::new(reader.as_mut(), device, DType::F32);
    let unet = Unet::load(&config, &mut w).expect("BK UNet loads");
    w.finish(&[]).expect("no key left over");
    unet
}

#[test]
fn tokenizer_matches_transformers() {
    let dir = fixtures().join("tiny-sd/tokenizer");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("tokenizer file");
    let tokenizer =
        ClipTokenizer::from_files(&read("vocab.json"), &read("merges.txt")).expect("loads");
    let expected: BTreeMap<String, Vec<u32>> = read_json("tokens.json");
    assert!(expected.len() >= 10, "the golden prompt set is complete");
    for (prompt, ids) in &expected {
        assert_eq!(&tokenizer.encode(prompt), ids, "prompt {prompt:?}");
    }
}

#[derive(serde::Deserialize)]
struct ScheduleGolden {
    timesteps: BTreeMap<String, Vec<i64>>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
}

#[test]
fn schedule_matches_ddim_scheduler() {
    let sd_schedule = load_tiny(&dragonedit::device::cpu()).schedule;
    let golden: ScheduleGolden = read_json("schedule.json");
    for (steps, expected) in &golden.timesteps {
        let steps: usize = steps.parse().expect("step count");
        assert_eq!(&sd_schedule.timesteps(steps), expected, "{steps} steps");
    }
    let ours: Vec<f32> = (0..golden.alphas_cumprod.len() as i64)
        .map(|t| sd_schedule.alpha_bar(t))
        .collect();
    // Both sides compute a cumulative product of 1000 factors in f32 (torch) and f64 (ours).
    assert_close("alphas_cumprod", &ours, &golden.alphas_cumprod, 1e-5);
    assert_close(
        "final alpha",
        &[sd_schedule.alpha_bar(-1)],
        &[golden.final_alpha_cumprod],
        1e-6,
    );
}

fn text_encoder(device: &Device, tol: f32) {
    check_text(&load_tiny(device), "text hidden states", tol);
}

/// The hidden states of the three encoded golden prompts.
fn check_text(sd: &StableDiffusion, what: &str, tol: f32) {
    let got = sd
        .encode_prompts(&["", "a photo of a cat", "a red cup on a wooden table"])
        .expect("encodes");
    assert_close(
        what,
        &values(got),
        &golden("text.npz", "hidden").values,
        tol,
    );
}

fn context(sd: &StableDiffusion) -> Tensor<3> {
    sd.encode_prompts(&["", "a photo of a cat"])
        .expect("encodes")
}

/// ε and the up_blocks.1/2 outputs on a non-square 8x12 latent: every decoder stage upsamples
/// to its skip's size (4x6 → 2x3 → 1x2 on the way down).
fn unet(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let context = context(&sd);
    let x: Tensor<4> = golden("unet.npz", "x").tensor(device);
    for t in [981, 941, 901] {
        let eps = sd.unet.forward(x.clone(), t as f32, &context, &mut NoHook);
        assert_close(
            &format!("eps t={t}"),
            &values(eps),
            &golden("unet.npz", &format!("eps_{t}")).values,
            tol,
        );
        let feats = sd.unet.up_block_features(x.clone(), t as f32, &context, 2);
        for level in [1usize, 2] {
            let expected = golden("unet.npz", &format!("up{level}_{t}"));
            assert_eq!(feats[level].dims().to_vec(), expected.shape);
            assert_close(
                &format!("up_blocks.{level} t={t}"),
                &values(feats[level].clone()),
                &expected.values,
                tol,
            );
        }
    }
}

/// A UNet with three stages, one layer per block and no mid block loads from its config and
/// predicts what diffusers predicts.
fn bk_unet(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let context = context(&sd);
    let unet = load_bk_unet(device);
    let x: Tensor<4> = golden("unet_bk.npz", "x").tensor(device);
    for t in [981, 941, 901] {
        let eps = unet.forward(x.clone(), t as f32, &context, &mut NoHook);
        assert_close(
            &format!("BK eps t={t}"),
            &values(eps),
            &golden("unet_bk.npz", &format!("eps_{t}")).values,
            tol,
        );
    }
}

fn vae(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let image: Tensor<4> = golden("vae.npz", "image").tensor(device);
    let latent = sd.encode_image(image).expect("encodes");
    assert_close(
        "VAE encode",
        &values(latent),
        &golden("vae.npz", "latent").values,
        tol,
    );
    let decoded = sd.decode(golden("vae.npz", "decode_in").tensor(device));
    // diffusers returns the raw decoder output; ours maps it to [0, 1] and clamps.
    let expected: Vec<f32> = golden("vae.npz", "decoded")
        .values
        .iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    assert_close("VAE decode", &values(decoded), &expected, tol);
}

/// DDIMScheduler sampling with CFG 7.5 from fixed noise, the §2.1 inversion, and the plain
/// reconstruction (g = 1) from its last latent: 150 chained UNet calls in all. Measured on the
/// CPU: 1e-6 to 3e-5, so the single-pass bound holds. CPU only: on lavapipe 150 UNet calls
/// take many minutes, and tests/parity.rs already chains 50 on wgpu.
fn ddim(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let z_t: Tensor<4> = golden("ddim.npz", "z_t").tensor(device);
    let generated =
        block_on(sd.sample(z_t, "a photo of a cat", 7.5, 50, &mut |_| true)).expect("samples");
    assert_close(
        "generated latent",
        &values(generated),
        &golden("ddim.npz", "generated").values,
        tol,
    );

    let cond = context(&sd).narrow(0, 1, 1);
    let image: Tensor<4> = golden("vae.npz", "image").tensor(device);
    let z0 = sd.encode_image(image).expect("encodes");
    let latents = block_on(sd.invert(z0, &cond, 50, &mut NoHook, &mut |_| true)).expect("inverts");
    let expected = golden("ddim.npz", "inversion");
    for k in [1usize, 10, 25, 50] {
        assert_close(
            &format!("inversion latent {k}"),
            &values(latents[k].clone()),
            &expected.index(k).values,
            tol,
        );
    }
    let z_t = latents[50].clone();
    let reconstructed =
        block_on(sd.sample(z_t, "a photo of a cat", 1.0, 50, &mut |_| true)).expect("samples");
    assert_close(
        "reconstructed latent",
        &values(reconstructed),
        &golden("ddim.npz", "reconstructed").values,
        tol,
    );
}

/// Each model test on the CPU, and on wgpu where an adapter exists.
macro_rules! on_both_backends {
    ($($name:ident),*) => {
        mod cpu {
            $(#[test] fn $name() { super::$name(&dragonedit::device::cpu(), super::CPU_TOL); })*
        }
        mod gpu {
            $(#[test] fn $name() {
                if let Some(device) = super::wgpu_device() {
                    super::$name(&device, super::GPU_TOL);
                }
            })*
        }
    };
}

on_both_backends!(text_encoder, unet, bk_unet, vae);

#[test]
fn ddim_on_cpu() {
    ddim(&dragonedit::device::cpu(), CPU_TOL);
}

/// The same goldens with the model computing in f16 (the `--f16` path): the weights are f16
/// values already, so only the arithmetic rounds. f16 keeps 11 significant bits (4.9e-4
/// relative per operation); measured: text 9e-4 (CPU) and 1.4e-3 (lavapipe), UNet 2.7e-3 and
/// 7.8e-3, so 2e-2 bounds it, while a model silently left in f32 (1e-6) or a wrong layer
/// (order 1) would be told apart.
fn f16(device: &Device) {
    if !device.supports_dtype(DType::F16) {
        println!("SKIPPED f16: the device has no f16");
        return;
    }
    let mut source = DirSource::new(common::tiny_model_dir()).expect("tiny model folder");
    let sd = StableDiffusion::load(&mut source, device, DType::F16, &mut |_| true)
        .expect("loads in f16");
    assert_eq!(
        sd.unet.up_block_features(
            golden("unet.npz", "x").tensor(device),
            981.0,
            &context(&sd),
            0
        )[0]
        .dtype(),
        DType::F32,
        "models hand f32 back"
    );
    check_text(&sd, "f16 text hidden states", F16_TOL);
    let context = context(&sd);
    let x: Tensor<4> = golden("unet.npz", "x").tensor(device);
    let eps = sd.unet.forward(x, 981.0, &context, &mut NoHook);
    assert_close(
        "f16 eps t=981",
        &values(eps),
        &golden("unet.npz", "eps_981").values,
        F16_TOL,
    );
    // The VAE's weights are f16; its encoder computes in f32 (so the f32 bound holds: the
    // weights are f16 values already), its decoder in f16 (as the official f16 pipeline does),
    // through the checked call the editor makes.
    assert_eq!(sd.vae.dtype(), DType::F16);
    let image: Tensor<4> = golden("vae.npz", "image").tensor(device);
    let latent = sd.encode_image(image).expect("encodes");
    assert_close(
        "VAE encode in an f16 pipeline",
        &values(latent),
        &golden("vae.npz", "latent").values,
        CPU_TOL,
    );
    let decode_in: Tensor<4> = golden("vae.npz", "decode_in").tensor(device);
    let (decoded, size) = block_on(sd.decode_values(decode_in.clone())).expect("decodes");
    let [_, _, h, w] = decode_in.dims();
    assert_eq!(size, (8 * h, 8 * w), "the decoded image's size");
    let expected: Vec<f32> = golden("vae.npz", "decoded")
        .values
        .iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    assert_close("f16 VAE decode", &decoded, &expected, F16_TOL);

    // Where f16 overflows, the VAE runs again in f32. A latent 1e5 times too large passes
    // f16's range as it is cast (any value over 0.12: 0.12e5 / 0.18215 > 65504), so the f16
    // result is not finite; the checked decode must equal an f32 decode on the same
    // (f16-valued) weights, finite.
    let huge = decode_in * 1e5;
    let in_f16 = values(sd.vae.decode_unclamped_in(huge.clone(), DType::F16));
    assert!(
        in_f16.iter().any(|v| !v.is_finite()),
        "the overflow this checks did not happen"
    );
    let (checked, _) = block_on(sd.decode_values(huge.clone())).expect("decodes");
    assert!(
        checked.iter().all(|v| v.is_finite()),
        "the f32 retry is not finite"
    );
    let in_f32 = values(sd.vae.decode_in(huge, DType::F32));
    assert_close("f32 retry of the decode", &checked, &in_f32, CPU_TOL);
}

const F16_TOL: f32 = 2e-2;

#[test]
fn f16_on_cpu() {
    f16(&dragonedit::device::cpu());
}

#[test]
fn f16_on_gpu() {
    if let Some(device) = wgpu_device() {
        f16(&device);
    }
}
