//! The editing engine: working-resolution images → VAE latents → DDIM inversion (with the
//! memory bank) → initial-latent edit → guided DDIM sampling → decoded image
//! (ALGORITHM.md §9, the `'D'` path).

use burn::tensor::Tensor;
use image::{RgbImage, imageops::FilterType};

use super::bank::{BankEntry, BankInjection, BankPolicy, SharedPassInjection, TokenMasks};
use super::guidance::{self, GradientMemory, Guidance, ReferenceFeatures};
use super::initial::{initial_latent, place};
use super::inversion_cache::{Inversion, InversionCache, Kept, Source, inversion_key};
use super::mask::{Mask, Placement};
use super::plan::{EditPlan, Fidelity};
use super::spec::Edit;
use crate::StableDiffusion;
use crate::device::{one_buffer_per_allocation, read_back, release_unused};
use crate::diffusion::ddim;
use crate::error::{Error, Result};
use crate::image as pixels;
use crate::model::unet::{DecoderAttention, KvHook, NoHook};
use crate::progress::{Phase, ProgressFn, report, step_done};

/// Engine settings that are not part of the edit itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineOptions {
    pub bank: BankPolicy,
    pub fidelity: Fidelity,
    pub gradients: GradientMemory,
}

/// Live previews during an edit: every `every` editing steps, `show(step, image)` gets the
/// current clean-image estimate x̂0, mapped to RGB without the VAE (`image::latent_preview`).
pub struct Preview<'a> {
    pub every: usize,
    pub show: &'a mut dyn FnMut(usize, RgbImage),
}

/// The first guided step in detail, as the reference fixtures' `first_guided_step.npz`.
pub struct FirstStep {
    pub latent: Tensor<4>,
    pub latent_ref: Tensor<4>,
    pub eps_uncond: Tensor<4>,
    pub eps_text: Tensor<4>,
    pub guidance: Guidance,
    pub masks: Vec<(&'static str, Mask)>,
}

/// Intermediate tensors of a run, for `--trace` (the layout of the reference fixtures).
#[derive(Default)]
pub struct Trace {
    /// `steps + 1` latents `[B, 4, h, w]`, `z0` first.
    pub inversion_latents: Vec<Tensor<4>>,
    /// `z_T` after the initial edit, then the latent after each step.
    pub step_latents: Vec<Tensor<4>>,
    pub eps_cfg: Vec<Tensor<4>>,
    pub guidance: Vec<Tensor<4>>,
    /// `(E_edit, E_content)` per guided step (NaN where a term is absent).
    pub energies: Vec<(f32, f32)>,
    pub first_step: Option<FirstStep>,
    pub text_embeddings: Option<Tensor<3>>,
    pub inversion_text_embeddings: Option<Tensor<3>>,
    /// Device bytes of the memory-bank entries held at once (all stored ones, or one).
    pub bank_bytes: usize,
}

/// An edit's result.
pub struct EditOutput {
    /// The edited photo at the working resolution.
    pub image: RgbImage,
    pub final_latent: Tensor<4>,
}

/// Records the decoder self-attention K/V of the inversion passes whose editing step the
/// sampler will read: pass k of the inversion is editing step `steps − 1 − k`.
struct BankRecorder {
    wanted: Vec<bool>,
    pass: Option<usize>,
    entries: Vec<Option<BankEntry>>,
}

/// `t` in a buffer of its own. The self-attention's keys and values are slices of one product
/// that holds the queries too (`StackedLinear`): stored as they are, each entry would keep the
/// queries alive for the whole edit, half as much again as the keys and values.
fn own_copy(t: &Tensor<3>) -> Tensor<3> {
    t.clone() + 0.0
}

impl KvHook for BankRecorder {
    fn begin_pass(&mut self) {
        self.pass = Some(self.pass.map_or(0, |p| p + 1));
    }

    fn self_attention_kv(
        &mut self,
        layer: DecoderAttention,
        key: Tensor<3>,
        value: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        let steps = self.wanted.len();
        if let Some(k) = self.pass
            && k < steps
        {
            let step = steps - 1 - k;
            if self.wanted[step] {
                self.entries[step]
                    .get_or_insert_with(BankEntry::default)
                    .layers
                    .insert(layer, (own_copy(&key), own_copy(&value)));
            }
        }
        (key, value)
    }
}

/// Where one editing step's memory-bank K/V come from.
#[derive(Clone, Copy)]
pub enum StepBank<'a> {
    /// The step injects nothing.
    Off,
    /// The entry stored during the inversion ([`BankPolicy::Store`]).
    Stored(&'a BankEntry),
    /// Recomputed from the inversion's latent in the step's own UNet pass
    /// ([`BankPolicy::Recompute`]).
    Shared(&'a Inversion),
}

/// Runs edits with one loaded model.
pub struct Editor<'a> {
    pub sd: &'a StableDiffusion,
    pub options: EngineOptions,
}

impl<'a> Editor<'a> {
    pub fn new(sd: &'a StableDiffusion, options: EngineOptions) -> Self {
        Self { sd, options }
    }

    /// The plan of `edit` at its working resolution.
    pub fn plan(&self, edit: &Edit) -> Result<EditPlan> {
        let (w, h) = pixels::working_size(edit.image.width(), edit.image.height(), edit.resolution);
        let plan = EditPlan::new(edit, (h as usize, w as usize), self.options.fidelity)?;
        self.sd.check_fits(plan.spaces.working)?;
        Ok(plan)
    }

    /// VAE input `[B, 3, H, W]`: the photo at the working size and, in cross-image modes, the
    /// reference image resized to the same size (and scaled about its centre when pasting).
    pub fn images(&self, edit: &Edit, plan: &EditPlan) -> Result<Tensor<4>> {
        let (h, w) = plan.spaces.working;
        let device = self.sd.device();
        let resize = |img: &RgbImage| {
            if img.dimensions() == (w as u32, h as u32) {
                img.clone()
            } else {
                image::imageops::resize(img, w as u32, h as u32, FilterType::Lanczos3)
            }
        };
        let base = pixels::tensor_from_image(&resize(&edit.image), device);
        let Some(reference) = &edit.reference else {
            return Ok(base);
        };
        let mut r = pixels::tensor_from_image(&resize(reference), device);
        if plan.reference_scale != 1.0 {
            r = place(
                r,
                &Placement::new(h, plan.reference_scale, 0, false),
                &Placement::new(w, plan.reference_scale, 0, false),
            );
        }
        Ok(Tensor::cat(vec![base, r], 0))
    }

    /// Encodes and inverts the photo (and reference image).
    pub async fn invert(
        &self,
        edit: &Edit,
        plan: &EditPlan,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Inversion> {
        report(progress, Phase::EncodingPrompt, 0, 1)?;
        let prompts: Vec<&str> = if plan.inversion_batch() == 2 {
            vec![&edit.prompt, &edit.reference_prompt]
        } else {
            vec![&edit.prompt]
        };
        let context = self.sd.encode_prompts(&prompts)?;
        report(progress, Phase::EncodingImage, 0, 1)?;
        // One photo at a time: the encoder's widest activation is then one photo's, which is
        // what the check in `plan` allows for (half of what the pair needs at once).
        let images = self.images(edit, plan)?;
        let z0 = Tensor::cat(
            (0..plan.inversion_batch())
                .map(|i| self.sd.encode_image(images.clone().narrow(0, i, 1)))
                .collect::<Result<Vec<_>>>()?,
            0,
        );
        // The VAE's activations are free once the latent exists: their pages go back before
        // the UNet's are taken.
        read_back(z0.clone()).await?;
        release_unused(self.sd.device());
        self.invert_latent(plan, z0, context, progress).await
    }

    /// DDIM inversion of VAE latents `z0` `[B, 4, h, w]` with `context` `[B, 77, C]`.
    pub async fn invert_latent(
        &self,
        plan: &EditPlan,
        z0: Tensor<4>,
        context: Tensor<3>,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Inversion> {
        let steps = plan.steps;
        let (latents, bank) = match self.options.bank {
            BankPolicy::Recompute => (
                self.sd
                    .invert(z0, &context, steps, &mut NoHook, progress)
                    .await?,
                None,
            ),
            BankPolicy::Store => {
                let mut recorder = BankRecorder {
                    wanted: (0..steps).map(|i| plan.injects(i)).collect(),
                    pass: None,
                    entries: vec![None; steps],
                };
                let latents = self
                    .sd
                    .invert(z0, &context, steps, &mut recorder, progress)
                    .await?;
                (latents, Some(recorder.entries))
            }
        };
        Ok(Inversion {
            latents,
            context,
            bank,
        })
    }

    /// The whole edit: inversion, sampling, decoding.
    pub async fn run(
        &self,
        edit: &Edit,
        trace: Option<&mut Trace>,
        progress: &mut ProgressFn<'_>,
    ) -> Result<EditOutput> {
        self.run_with_preview(edit, trace, progress, None).await
    }

    /// [`Editor::run`], showing a preview every few steps.
    pub async fn run_with_preview(
        &self,
        edit: &Edit,
        trace: Option<&mut Trace>,
        progress: &mut ProgressFn<'_>,
        preview: Option<&mut Preview<'_>>,
    ) -> Result<EditOutput> {
        let mut cache = InversionCache::with_feature_budget(0);
        self.run_reusing(edit, &mut cache, trace, progress, preview)
            .await
    }

    /// [`Editor::run_with_preview`], taking the inversion from `cache` when it was made from
    /// the same inputs, and leaving this edit's inversion there for the next one.
    pub async fn run_reusing(
        &self,
        edit: &Edit,
        cache: &mut InversionCache,
        mut trace: Option<&mut Trace>,
        progress: &mut ProgressFn<'_>,
        preview: Option<&mut Preview<'_>>,
    ) -> Result<EditOutput> {
        let plan = self.plan(edit)?;
        let key = inversion_key(edit, &plan, self.options.bank);
        let kept = match cache.take_matching(&key) {
            Some(kept) => {
                report(progress, Phase::Inverting, plan.steps, plan.steps)?;
                kept
            }
            None => Kept::new(key, self.invert(edit, &plan, progress).await?),
        };
        let mut source = cache.keep(kept);
        let inversion = source.inversion;
        let context = self.sd.encode_prompts(&["", &edit.prompt])?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.inversion_latents = inversion.latents.clone();
            tr.text_embeddings = Some(context.clone());
            tr.inversion_text_embeddings = Some(inversion.context.clone());
        }
        let z = self
            .sample(&plan, &mut source, &context, trace, progress, preview)
            .await?;
        report(progress, Phase::Decoding, 0, 1)?;
        // `sample` read the final latent back, so the UNet's pages are free; the VAE decoder
        // then takes its own, and they go back once the image is on the host.
        release_unused(self.sd.device());
        let (values, (h, w)) = self.sd.decode_values(z.clone()).await?;
        release_unused(self.sd.device());
        let image = pixels::image_from_values(&values, h, w)?;
        Ok(EditOutput {
            image,
            final_latent: z,
        })
    }

    /// Where editing step `step` takes its memory bank from: nowhere, the inversion's stored
    /// entry, or the step's own UNet pass.
    pub fn step_bank<'b>(
        &self,
        plan: &EditPlan,
        inversion: &'b Inversion,
        step: usize,
    ) -> StepBank<'b> {
        if !plan.injects(step) {
            return StepBank::Off;
        }
        match inversion.bank.as_ref().and_then(|b| b.get(step)) {
            Some(Some(entry)) => StepBank::Stored(entry),
            _ => StepBank::Shared(inversion),
        }
    }

    /// The CFG noise prediction pair `[2, 4, h, w]` (unconditional, conditional) of editing step
    /// `step` at `z`, with the memory bank injected where the plan says, and the device bytes of
    /// the bank entry it used (for the trace).
    pub fn eps_pair(
        &self,
        plan: &EditPlan,
        z: &Tensor<4>,
        step: usize,
        context: &Tensor<3>,
        bank: StepBank<'_>,
        tokens: Option<&mut TokenMasks>,
    ) -> (Tensor<4>, usize) {
        let t = self.sd.schedule.timesteps(plan.steps)[step] as f32;
        let pair = Tensor::cat(vec![z.clone(), z.clone()], 0);
        match bank {
            StepBank::Off => (self.sd.unet.forward(pair, t, context, &mut NoHook), 0),
            StepBank::Stored(entry) => {
                let mut hook = BankInjection {
                    injection: plan.injection,
                    entry,
                    tokens,
                };
                let eps = self.sd.unet.forward(pair, t, context, &mut hook);
                (eps, entry.bytes())
            }
            StepBank::Shared(inversion) => {
                // The inversion's UNet call at this timestep had this input (§2.2).
                let bank_latent = inversion.latents[plan.steps - 1 - step].clone();
                let bank_rows = bank_latent.dims()[0];
                let mut hook = SharedPassInjection {
                    injection: plan.injection,
                    bank_rows,
                    tokens,
                    bank_bytes: 0,
                };
                let batch = Tensor::cat(vec![bank_latent, pair], 0);
                let contexts = Tensor::cat(vec![inversion.context.clone(), context.clone()], 0);
                let eps = self.sd.unet.forward(batch, t, &contexts, &mut hook);
                (eps.narrow(0, bank_rows, 2), hook.bank_bytes)
            }
        }
    }

    /// Guided DDIM sampling from the inversion (ALGORITHM.md §5.5, §9). `context` is the CFG
    /// context `[2, 77, C]` (unconditional first).
    async fn sample(
        &self,
        plan: &EditPlan,
        source: &mut Source<'_>,
        context: &Tensor<3>,
        mut trace: Option<&mut Trace>,
        progress: &mut ProgressFn<'_>,
        mut preview: Option<&mut Preview<'_>>,
    ) -> Result<Tensor<4>> {
        let inversion = source.inversion;
        let steps = plan.steps;
        let schedule = &self.sd.schedule;
        let stride = schedule.stride(steps) as i64;
        let timesteps = schedule.timesteps(steps);
        let cond = context.clone().narrow(0, 1, 1);
        let z_t = inversion.latents[steps].clone();
        let mut z = initial_latent(&plan.latent_edit, z_t).await?;
        let mut tokens = plan
            .token_masks
            .as_ref()
            .map(|(b, r)| TokenMasks::new(b.clone(), r.clone()));
        let stored_bytes: usize = inversion
            .bank
            .iter()
            .flatten()
            .flatten()
            .map(BankEntry::bytes)
            .sum();
        if let Some(tr) = trace.as_deref_mut() {
            tr.step_latents.push(z.clone());
            tr.bank_bytes = stored_bytes;
        }
        let g = plan.strengths.guidance_scale as f32;
        let hand_back = one_buffer_per_allocation(self.sd.device());
        report(progress, Phase::Editing, 0, steps)?;
        for (i, &t) in timesteps.iter().enumerate() {
            // The guidance runs before the step's CFG pass; neither needs the other. In the
            // browser's pool layout (a buffer per allocation, kept per size bucket) this order
            // took the editing phase's peak from 2505 to 2444 MiB (SD 1.5-sized f16 model,
            // 256 px, lavapipe; docs/BENCHMARKS.md): the two sets of buffers share the buckets
            // better this way round. A guidance that fails also fails before the pass is run.
            let guided = if plan.is_guided(i) {
                if hand_back && i > 0 {
                    // The previous step's CFG pass left its buffers in their buckets. Beside
                    // them a tiny-model 512 px edit's editing phase peaked at 159 MiB with two
                    // guided steps against 120 with one; handed back here, two and three: 125.
                    release_unused(self.sd.device());
                }
                // The drag quirk's step-0 reference is this edit's own patched latent.
                let own = i == 0 && plan.step0_reference_is_initial_latent();
                let reference = if own {
                    z.clone()
                } else {
                    inversion.latents[steps - i].clone()
                };
                let compute =
                    || ReferenceFeatures::compute(&self.sd.unet, &reference, t as f32, &cond);
                let refs = if own {
                    compute()
                } else {
                    source.reference_features(i, compute)
                };
                let gd = guidance::evaluate_with(
                    &self.sd.unet,
                    plan,
                    &z,
                    &refs,
                    t as f32,
                    &cond,
                    self.options.gradients,
                )
                .await?;
                if !gd.e_edit.is_finite() && !gd.e_content.is_finite() {
                    return Err(Error::InvalidInput(format!(
                        "the guidance energy at step {i} is not finite; lower the strengths"
                    )));
                }
                Some((gd, reference))
            } else {
                None
            };
            if hand_back && guided.is_some() {
                // The guidance's freed buffers would otherwise stay in their buckets beside the
                // CFG pass's. This submits the queued work but waits for none of it: wgpu
                // keeps a buffer alive until the work that uses it has run.
                release_unused(self.sd.device());
            }
            let bank = self.step_bank(plan, inversion, i);
            let (pair, bank_bytes) = self.eps_pair(plan, &z, i, context, bank, tokens.as_mut());
            if let (Some(tr), None) = (trace.as_deref_mut(), &inversion.bank) {
                tr.bank_bytes = tr.bank_bytes.max(bank_bytes);
            }
            let eps = ddim::classifier_free(pair.clone(), g);
            let a_t = schedule.alpha_bar(t);
            let a_prev = schedule.alpha_bar(t - stride);
            let eps_x0 = if let Some((gd, reference)) = guided {
                let eps_x0 = eps.clone() + gd.guidance.clone();
                if let Some(tr) = trace.as_deref_mut() {
                    tr.guidance.push(gd.guidance.clone());
                    tr.energies.push((gd.e_edit, gd.e_content));
                    if i == 0 {
                        tr.first_step = Some(FirstStep {
                            latent: z.clone(),
                            latent_ref: reference,
                            eps_uncond: pair.clone().narrow(0, 0, 1),
                            eps_text: pair.narrow(0, 1, 1),
                            guidance: gd,
                            masks: plan.trace_masks(),
                        });
                    }
                }
                eps_x0
            } else {
                eps.clone()
            };
            if let Some(tr) = trace.as_deref_mut() {
                tr.eps_cfg.push(eps.clone());
            }
            if let Some(p) = preview.as_deref_mut()
                && (i + 1) % p.every.max(1) == 0
                && i + 1 < steps
            {
                let x0 = ddim::predict_x0(z.clone(), eps_x0.clone(), a_t);
                let [_, _, h, w] = x0.dims();
                let values = read_back(x0).await?;
                (p.show)(i + 1, pixels::latent_preview(&values, h, w)?);
            }
            z = ddim::step(z, eps_x0, eps, a_t, a_prev);
            if let Some(tr) = trace.as_deref_mut() {
                tr.step_latents.push(z.clone());
            }
            step_done(progress, Phase::Editing, i + 1, steps, &z).await?;
        }
        let finite = read_back(z.clone()).await?.iter().all(|x| x.is_finite());
        if !finite {
            return Err(Error::InvalidInput(
                "the edit diverged (non-finite latent); lower energy_scale or guidance_scale"
                    .into(),
            ));
        }
        Ok(z)
    }
}
