//! Deterministic DDIM (eta = 0): the denoising step, the inversion step of ALGORITHM.md §2.1,
//! and the loops that run them with the UNet, with classifier-free guidance when sampling.

use burn::tensor::Tensor;

use super::schedule::Schedule;
use crate::error::Result;
use crate::model::unet::{KvHook, NoHook, Unet};
use crate::progress::{Phase, ProgressFn, report, step_done};

/// One deterministic DDIM step from ᾱ = `a_t` to `a_prev`. The clean-image estimate uses
/// `eps_x0` and the direction term `eps_dir`: they differ only when guidance is added to the
/// former alone (ALGORITHM.md §5.5); plain sampling passes the same ε twice.
pub fn step(
    z: Tensor<4>,
    eps_x0: Tensor<4>,
    eps_dir: Tensor<4>,
    a_t: f32,
    a_prev: f32,
) -> Tensor<4> {
    predict_x0(z, eps_x0, a_t) * a_prev.sqrt() + eps_dir * (1.0 - a_prev).sqrt()
}

/// The clean-latent estimate x̂0 of `z` at ᾱ = `a_t` with noise prediction `eps`.
pub fn predict_x0(z: Tensor<4>, eps: Tensor<4>, a_t: f32) -> Tensor<4> {
    (z - eps * (1.0 - a_t).sqrt()) / a_t.sqrt()
}

/// Inversion step k (0-based) of ALGORITHM.md §2.1: from `z` at the lower level
/// `t - stride` to level `t = 1 + stride·k`, with ε predicted at `t`.
pub fn invert_step(z: Tensor<4>, eps: Tensor<4>, a_lower: f32, a_t: f32) -> Tensor<4> {
    let x0 = (z - eps.clone() * (1.0 - a_lower).sqrt()) / a_lower.sqrt();
    x0 * a_t.sqrt() + eps * (1.0 - a_t).sqrt()
}

/// ε = ε_u + g (ε_c − ε_u) from a `[2, ...]` batch ordered (unconditional, conditional).
pub fn classifier_free(eps_pair: Tensor<4>, guidance_scale: f32) -> Tensor<4> {
    let uncond = eps_pair.clone().narrow(0, 0, 1);
    let cond = eps_pair.narrow(0, 1, 1);
    uncond.clone() + (cond - uncond) * guidance_scale
}

/// DDIM inversion conditioned on `context` only (no CFG): returns all `steps + 1` latents,
/// `[z0, z at t=1, t=21, ..., t=981]`. `hook` sees the decoder self-attention K/V of each UNet
/// call, in order (the memory bank records there).
pub async fn invert(
    unet: &Unet,
    schedule: &Schedule,
    z0: Tensor<4>,
    context: &Tensor<3>,
    steps: usize,
    hook: &mut dyn KvHook,
    progress: &mut ProgressFn<'_>,
) -> Result<Vec<Tensor<4>>> {
    let stride = schedule.stride(steps) as i64;
    let mut latents = Vec::with_capacity(steps + 1);
    latents.push(z0.clone());
    report(progress, Phase::Inverting, 0, steps)?;
    let mut z = z0;
    for (k, t) in schedule.timesteps(steps).into_iter().rev().enumerate() {
        let eps = unet.forward(z.clone(), t as f32, context, hook);
        z = invert_step(
            z,
            eps,
            schedule.alpha_bar(t - stride),
            schedule.alpha_bar(t),
        );
        latents.push(z.clone());
        step_done(progress, Phase::Inverting, k + 1, steps, &z).await?;
    }
    Ok(latents)
}

/// Plain DDIM sampling with classifier-free guidance from `z_t` at the first timestep.
/// `uncond_cond` is the `[2, 77, C]` context (unconditional first).
pub async fn sample(
    unet: &Unet,
    schedule: &Schedule,
    z_t: Tensor<4>,
    uncond_cond: &Tensor<3>,
    guidance_scale: f32,
    steps: usize,
    progress: &mut ProgressFn<'_>,
) -> Result<Tensor<4>> {
    let stride = schedule.stride(steps) as i64;
    let mut z = z_t;
    report(progress, Phase::Sampling, 0, steps)?;
    for (i, t) in schedule.timesteps(steps).into_iter().enumerate() {
        let eps = if guidance_scale == 1.0 {
            let cond = uncond_cond.clone().narrow(0, 1, 1);
            unet.forward(z.clone(), t as f32, &cond, &mut NoHook)
        } else {
            let pair = Tensor::cat(vec![z.clone(), z.clone()], 0);
            classifier_free(
                unet.forward(pair, t as f32, uncond_cond, &mut NoHook),
                guidance_scale,
            )
        };
        z = step(
            z,
            eps.clone(),
            eps,
            schedule.alpha_bar(t),
            schedule.alpha_bar(t - stride),
        );
        step_done(progress, Phase::Sampling, i + 1, steps, &z).await?;
    }
    Ok(z)
}
