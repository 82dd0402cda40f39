//! Parity of the SD 1.5 building blocks with the reference implementation (diffusers 0.18 /
//! transformers 4.30 as run by the official DragonDiffusion release, in float32 on the CPU), on
//! the tiny random model in tests/fixtures/tiny-sd. See tests/fixtures/README.md.
//!
//! Each test runs on burn's CPU backend (flex) and, where a Vulkan adapter exists, on wgpu.
//! Tolerances are relative to the largest magnitude of the reference tensor:
//! - CPU: 1e-4. Both sides compute in f32 from the same f16-exact weights; what remains is
//!   summation order in matmuls/convolutions (~1e-6 per op) compounded over the network.
//! - wgpu: 1e-3. GPU kernels reorder sums more aggressively (tiled matmuls, fused ops) and
//!   use fast exp/rsqrt approximations; 1e-3 still catches any wrong layer or constant.

mod common;

use burn::tensor::{Device, Tensor};
use common::*;
use dragonedit::image;
use dragonedit::model::unet::NoHook;
use pollster::block_on;

const CPU_TOL: f32 = 1e-4;
const GPU_TOL: f32 = 1e-3;

fn text_encoder(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let expected = npy("move", "text_embeddings.npy");
    let got = sd
        .encode_prompts(&["", "a photo of a red ball on the table"])
        .expect("encodes");
    assert_eq!(got.dims().to_vec(), expected.shape);
    assert_close("text embeddings", &values(got), &expected.values, tol);
}

fn vae_encode(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let bytes = std::fs::read(fixtures().join("move/image.png")).expect("image");
    let img = image::decode(&bytes).expect("decodes");
    let x = image::tensor_from_image(&img, device);
    let z = sd.encode_image(x).expect("encodes");
    let expected = npy("move", "vae_latent.npy");
    assert_eq!(z.dims().to_vec(), expected.shape);
    assert_close("VAE latent", &values(z), &expected.values, tol);
}

fn vae_decode(device: &Device) {
    let sd = load_tiny(device);
    let z: Tensor<4> = npy("move", "final_latent.npy").tensor(device);
    let img = sd.decode(z);
    let [_, _, h, w] = img.dims();
    let ours = image::image_from_values(&values(img), h, w).expect("finite");
    let bytes = std::fs::read(fixtures().join("move/output.png")).expect("png");
    let reference = image::decode(&bytes).expect("decodes");
    assert_eq!(ours.dimensions(), reference.dimensions());
    // The reference PNG is round(x·255); a float difference far below 1e-4 can still flip a
    // value sitting on a rounding boundary, so allow 1 level, and only on a few pixels.
    let diffs: Vec<i32> = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
        .collect();
    let max = diffs.iter().copied().max().unwrap_or(0);
    let off = diffs.iter().filter(|&&d| d > 0).count();
    assert!(max <= 1, "decoded pixels differ by up to {max} levels");
    assert!(
        off * 100 <= diffs.len(),
        "{off} of {} values differ",
        diffs.len()
    );
}

/// The editing loop's first steps use the stock UNet (no memory bank yet, ALGORITHM.md §2.2),
/// so their CFG noise predictions are plain UNet outputs at t = 981, 941 and 901.
fn unet_eps(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let latents = npy("move", "step_latents.npy");
    let eps = npy("move", "eps_cfg.npy");
    let context: Tensor<3> = npy("move", "text_embeddings.npy").tensor(device);
    for i in [0usize, 2, 4] {
        let t = 981 - 20 * i;
        let z: Tensor<4> = latents.index(i).tensor(device);
        let pair = Tensor::cat(vec![z.clone(), z], 0);
        let out = sd.unet.forward(pair, t as f32, &context, &mut NoHook);
        let cfg = dragonedit::diffusion::ddim::classifier_free(out, 4.0);
        assert_close(
            &format!("eps_cfg at t={t}"),
            &values(cfg),
            &eps.index(i).values,
            tol,
        );
    }
}

/// The guidance's feature taps: outputs of up_blocks.1 and up_blocks.2 of the truncated UNet.
fn up_block_features(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let cond: Tensor<3> = npy("move", "text_embeddings.npy")
        .tensor::<3>(device)
        .narrow(0, 1, 1);
    for (input, prefix) in [("latent_ref", "feat_ref"), ("latent", "feat_gen")] {
        let z: Tensor<4> = npz("move", "first_guided_step.npz", input).tensor(device);
        let feats = sd.unet.up_block_features(z, 981.0, &cond, 2);
        assert_eq!(feats.len(), 3);
        for level in [1usize, 2] {
            let expected = npz(
                "move",
                "first_guided_step.npz",
                &format!("{prefix}_up{level}"),
            );
            let got = feats[level].clone();
            assert_eq!(got.dims().to_vec(), expected.shape);
            assert_close(
                &format!("{prefix}_up{level}"),
                &values(got),
                &expected.values,
                tol,
            );
        }
    }
}

/// 50 DDIM inversion steps, stage by stage (each step from the reference's own input) and end
/// to end (chained through 50 UNet calls; measured 2e-6 on the CPU, so the same bound holds).
fn inversion(device: &Device, tol: f32) {
    let sd = load_tiny(device);
    let expected = npy("move", "inversion_latents.npy");
    let context: Tensor<3> = npy("move", "inversion_text_embeddings.npy").tensor(device);
    let timesteps = sd.schedule.timesteps(50);
    for (k, t) in timesteps.iter().rev().enumerate() {
        let z: Tensor<4> = expected.index(k).tensor(device);
        let eps = sd.unet.forward(z.clone(), *t as f32, &context, &mut NoHook);
        let next = dragonedit::diffusion::ddim::invert_step(
            z,
            eps,
            sd.schedule.alpha_bar(t - 20),
            sd.schedule.alpha_bar(*t),
        );
        assert_close(
            &format!("inversion step {k} (t={t})"),
            &values(next),
            &expected.index(k + 1).values,
            tol,
        );
    }
    let z0: Tensor<4> = expected.index(0).tensor(device);
    let chained =
        block_on(sd.invert(z0, &context, 50, &mut NoHook, &mut |_| true)).expect("inverts");
    assert_eq!(chained.len(), 51);
    for (k, z) in chained.into_iter().enumerate().step_by(10) {
        assert_close(
            &format!("chained inversion latent {k}"),
            &values(z),
            &expected.index(k).values,
            tol,
        );
    }
}

/// Generates each test twice: on the CPU, and on wgpu when an adapter exists. Attributes
/// before a name apply to the wgpu variant only.
macro_rules! parity_tests {
    ($($(#[$gpu_attr:meta])* $name:ident($($arg:tt)*);)*) => {
        mod cpu {
            use super::*;
            $(#[test] fn $name() { super::$name(&dragonedit::device::cpu() $(, parity_tests!(@tol CPU_TOL $arg))*); })*
        }
        mod gpu {
            use super::*;
            $($(#[$gpu_attr])* #[test] fn $name() {
                if let Some(device) = wgpu_device() {
                    super::$name(&device $(, parity_tests!(@tol GPU_TOL $arg))*);
                }
            })*
        }
    };
    (@tol $tol:ident tol) => { $tol };
}

// On Mesa's software Vulkan (lavapipe, what CI has) the wgpu variants take about 7 minutes in
// all, most of it JIT-compiling and autotuning the UNet's kernels on the CPU.
parity_tests! {
    text_encoder(tol);
    vae_encode(tol);
    vae_decode();
    unet_eps(tol);
    up_block_features(tol);
    inversion(tol);
}

/// The sampling step against the reference's editing loop: every `step_latents[i + 1]` follows
/// from `step_latents[i]` with the guided ε for x̂0 and the unguided ε for the direction
/// (ALGORITHM.md §5.5), for all 50 steps. Pure arithmetic, so the CPU bound applies everywhere.
#[test]
fn ddim_step_matches_the_reference_editing_loop() {
    let device = dragonedit::device::cpu();
    let schedule = dragonedit::diffusion::Schedule::sd15();
    let latents = npy("move", "step_latents.npy");
    let eps = npy("move", "eps_cfg.npy");
    let guidance = npy("move", "guidance.npy");
    for (i, t) in schedule.timesteps(50).into_iter().enumerate() {
        let z: Tensor<4> = latents.index(i).tensor(&device);
        let e: Tensor<4> = eps.index(i).tensor(&device);
        let e_x0 = if i < 30 {
            e.clone() + guidance.index(i).tensor::<4>(&device)
        } else {
            e.clone()
        };
        let next = dragonedit::diffusion::ddim::step(
            z,
            e_x0,
            e,
            schedule.alpha_bar(t),
            schedule.alpha_bar(t - 20),
        );
        assert_close(
            &format!("editing step {i}"),
            &values(next),
            &latents.index(i + 1).values,
            CPU_TOL,
        );
    }
}
