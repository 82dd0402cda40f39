//! One guidance evaluation (ALGORITHM.md §3, §5): features of the reference latent(s) without
//! gradient, features of the current latent with gradient through the truncated UNet, the
//! energies, their gradients with respect to the latent only, and the region composition.

use burn::tensor::Tensor;

use super::energy::{Level, energies};
use super::plan::EditPlan;
use crate::device::read_back;
use crate::error::{Error, Result};
use crate::model::nn::to_dtype;
use crate::model::pullback::widen;
use crate::model::unet::{FeatureCheckpoints, Keep, Unet};

/// The up blocks whose outputs are the features (`up_ft_index = [1, 2]`).
pub const FEATURE_BLOCKS: [usize; 2] = [1, 2];

/// The last up block the truncated forward runs: the largest of [`FEATURE_BLOCKS`].
const LAST_FEATURE_BLOCK: usize = {
    let (mut last, mut i) = (0, 0);
    while i < FEATURE_BLOCKS.len() {
        if FEATURE_BLOCKS[i] > last {
            last = FEATURE_BLOCKS[i];
        }
        i += 1;
    }
    last
};

/// How the gradient through the truncated UNet is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GradientMemory {
    /// burn's autodiff over the whole pass: every activation and every attention score chunk
    /// stays alive until the backward (gigabytes at 512 px, BURN.md §3).
    Tape,
    /// Each step keeps its own autodiff graph, but no self-attention score: the attention
    /// cores keep their inputs and output, and their chunked manual backward recomputes the
    /// scores, as FlashAttention does. Nothing else runs twice, but every graph is kept for
    /// both rows.
    Flash,
    /// The forward keeps only each step's input; the backward runs one step at a time again
    /// (`Unet::pull_back_features`). About one more truncated forward of work for the least
    /// memory.
    Recompute,
    /// The forward runs once, for one row, and keeps a few activations per step; the backward
    /// pulls both energies' rows back by hand through the convolutions, linear layers,
    /// attention cores, norms and activations (`Keep::Lean`). A third of flash's memory at SD
    /// 1.5's size, less work, and a third fewer kernel launches than autodiff of the norms
    /// (docs/BENCHMARKS.md).
    #[default]
    Lean,
}

/// Where the features' gradient is taken back to the latent.
enum Backward {
    Tape(Box<Tensor<4>>),
    Steps(Box<FeatureCheckpoints>),
}

/// What one guidance evaluation produced.
pub struct Guidance {
    /// Energies (λ-scaled) for reports and traces; NaN when the term is absent.
    pub e_edit: f32,
    pub e_content: f32,
    pub g_edit: Tensor<4>,
    pub g_content: Option<Tensor<4>>,
    /// κ (g_edit ⊙ m + g_content ⊙ (1 − m)), added to ε before the x̂0 estimate.
    pub guidance: Tensor<4>,
    /// Raw feature maps `[1, C, h, w]`, per feature block: generated, reference, replace.
    pub features: Vec<(Tensor<4>, Tensor<4>, Option<Tensor<4>>)>,
}

/// The features of one guided step's reference latent(s), taken without gradient: one map per
/// [`FEATURE_BLOCKS`] entry, `[B, C, h, w]`, in the model's dtype. They depend only on the
/// inversion latent, the step and the prompt, not on the edit, so the engine keeps them for
/// the next edit of the same photo (ALGORITHM.md §11: 7.9 MB per guided step at 512 px in f16).
#[derive(Clone)]
pub struct ReferenceFeatures(Vec<Tensor<4>>);

impl ReferenceFeatures {
    /// Runs the truncated UNet on `reference` `[B, 4, h, w]` at `timestep` with the
    /// conditional text embedding `context` `[1, 77, C]` (every row sees the same prompt).
    pub fn compute(unet: &Unet, reference: &Tensor<4>, timestep: f32, context: &Tensor<3>) -> Self {
        let ref_context = context.clone().repeat_dim(0, reference.dims()[0]);
        // Kept in the model's dtype (f32 would double an f16 model's); widened where used.
        let outputs = unet.up_block_outputs(
            reference.clone(),
            timestep,
            &ref_context,
            LAST_FEATURE_BLOCK,
        );
        Self(FEATURE_BLOCKS.iter().map(|&b| outputs[b].clone()).collect())
    }

    /// Device bytes they hold.
    pub fn bytes(&self) -> usize {
        self.0
            .iter()
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum()
    }
}

async fn scalar(t: &Option<Tensor<1>>) -> Result<f32> {
    match t {
        Some(t) => Ok(read_back(t.clone().without_autodiff()).await?[0]),
        None => Ok(f32::NAN),
    }
}

/// Evaluates the guidance at latent `z` `[1, 4, h, w]` and timestep `t`. `reference` is the
/// inversion latent of this step, `[B, 4, h, w]` (B = 2 in cross-image modes: base, reference
/// image); `context` the conditional text embedding `[1, 77, C]`.
pub async fn evaluate(
    unet: &Unet,
    plan: &EditPlan,
    z: &Tensor<4>,
    reference: &Tensor<4>,
    timestep: f32,
    context: &Tensor<3>,
    memory: GradientMemory,
) -> Result<Guidance> {
    let refs = ReferenceFeatures::compute(unet, reference, timestep, context);
    evaluate_with(unet, plan, z, &refs, timestep, context, memory).await
}

/// [`evaluate`] with the reference latent's features already taken.
pub async fn evaluate_with(
    unet: &Unet,
    plan: &EditPlan,
    z: &Tensor<4>,
    refs: &ReferenceFeatures,
    timestep: f32,
    context: &Tensor<3>,
    memory: GradientMemory,
) -> Result<Guidance> {
    let refs_batch = refs.0[0].dims()[0];

    // One graph for both energies: the latent enters twice, so row 0 carries the editing
    // energy's gradient and row 1 the content energy's (burn cannot keep a graph for a second
    // backward). Face mode has no content term and runs a batch of one.
    let has_content = !matches!(
        plan.energy,
        super::plan::EnergyPlan::Drag { other: None, .. }
    );
    let rows = if has_content { 2 } else { 1 };
    let keep = match memory {
        GradientMemory::Tape => None,
        GradientMemory::Flash => Some(Keep::Graphs),
        GradientMemory::Recompute => Some(Keep::Inputs),
        GradientMemory::Lean => Some(Keep::Lean),
    };
    // Both rows see the same forward: a backward that takes a batch of cotangents through one
    // row's checkpoints runs it once. Per-step graphs (flash) can only take back a cotangent of
    // their own batch.
    let forward_rows = match keep {
        Some(Keep::Lean | Keep::Inputs) => 1,
        _ => rows,
    };
    let latent = z.clone().without_autodiff().repeat_dim(0, forward_rows);
    let gen_context = context.clone().repeat_dim(0, forward_rows);
    let (backward, gens) = match keep {
        None => {
            let leaf = latent.autodiff().require_grad();
            let gens =
                unet.up_block_features(leaf.clone(), timestep, &gen_context, LAST_FEATURE_BLOCK);
            (Backward::Tape(Box::new(leaf)), gens)
        }
        Some(keep) => {
            let checkpoints = unet.checkpointed_features(
                latent,
                timestep,
                &gen_context,
                LAST_FEATURE_BLOCK,
                keep,
            );
            let gens = checkpoints
                .features()
                .iter()
                .map(|f| widen(f, rows).autodiff().require_grad())
                .collect();
            (Backward::Steps(Box::new(checkpoints)), gens)
        }
    };

    let mut edit_levels = Vec::new();
    let mut content_levels = Vec::new();
    let mut features = Vec::new();
    for (&b, r) in FEATURE_BLOCKS.iter().zip(&refs.0) {
        let g = gens[b].clone();
        let r = to_dtype(r.clone(), burn::tensor::DType::F32);
        let base = r.clone().narrow(0, 0, 1);
        let replace = (refs_batch > 1).then(|| r.clone().narrow(0, 1, 1));
        let g_edit = g.clone().narrow(0, 0, 1);
        let g_content = g.narrow(0, rows - 1, 1);
        features.push((
            g_edit.clone().without_autodiff(),
            base.clone(),
            replace.clone(),
        ));
        edit_levels.push(Level::new(g_edit, base.clone(), replace.clone()));
        content_levels.push(Level::new(g_content, base, replace));
    }
    let e = energies(plan, &edit_levels, &content_levels);
    let e_edit = scalar(&e.edit).await?;
    let e_content = scalar(&e.content).await?;
    let total = match (e.edit, e.content) {
        (Some(a), Some(b)) => a + b,
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => {
            return Err(Error::Spec(
                "every energy of this edit is empty: the masks or points select nothing".into(),
            ));
        }
    };
    let grads = total.backward();
    let grad = match backward {
        Backward::Tape(leaf) => leaf.grad(&grads),
        Backward::Steps(checkpoints) => {
            let at_features = gens.iter().map(|f| f.grad(&grads)).collect();
            unet.pull_back_features(*checkpoints, at_features)
        }
    };
    let grad = grad.ok_or_else(|| {
        Error::InvalidInput("the guidance energy does not depend on the latent".into())
    })?;
    let g_edit = grad.clone().narrow(0, 0, 1);
    let g_content = has_content.then(|| grad.narrow(0, 1, 1));
    let kappa = plan.kappa as f32;
    let guidance = match (&plan.composite, &g_content) {
        (Some(m), Some(gc)) => {
            let [_, _, h, w] = g_edit.dims();
            let mask = Tensor::<4>::from_data(
                burn::tensor::TensorData::new(m.to_f32(), [1, 1, h, w]),
                &g_edit.device(),
            );
            (g_edit.clone() * mask.clone() + gc.clone() * (mask.neg() + 1.0)) * kappa
        }
        _ => g_edit.clone() * kappa,
    };
    Ok(Guidance {
        e_edit,
        e_content,
        g_edit,
        g_content,
        guidance,
        features,
    })
}
