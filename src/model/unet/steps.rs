//! The UNet as a flat list of steps over one running tensor and a stack of skip states. The
//! forward walks it; the guidance's low-memory backward walks it in reverse, recomputing one
//! step at a time from the step inputs the forward kept ([`FeatureCheckpoints`]).

use burn::tensor::{DType, Tensor};

use super::transformer::Transformer2D;
use super::{KvHook, NoHook, Unet};
use crate::model::attention::AttentionPlan;
use crate::model::nn::{Conv2d, to_dtype, upsample_nearest};
use crate::model::pullback::{pullback, pullback2};
use crate::model::resnet::ResnetBlock;

/// One step of the UNet forward.
pub enum Step<'a> {
    /// `x = conv(x)`: `conv_in` and the downsamplers.
    Conv(&'a Conv2d),
    Resnet(&'a ResnetBlock),
    /// `x = resnet(cat(x, skip))` with the last skip state, taken off the stack.
    SkipResnet(&'a ResnetBlock),
    /// A Transformer2D; a decoder one is named `(up block, layer)` for the KV hook.
    Transformer(&'a Transformer2D, Option<(usize, usize)>),
    /// Nearest upsampling to the size of the last skip state (2x when there is none), then conv.
    Upsample(&'a Conv2d),
    /// Keep `x` as a skip state.
    Save,
    /// `x` is an up block's output.
    Output,
}

/// What every step sees: the time embedding, the text context, the attention plan.
pub(super) struct Env<'a> {
    pub temb: &'a Tensor<2>,
    pub context: &'a Tensor<3>,
    pub plan: &'a AttentionPlan,
}

/// The input of one computing step, kept by the checkpointed forward.
pub(super) struct Saved {
    x: Tensor<4>,
    skip: Option<Tensor<4>>,
    size: [usize; 2],
}

impl Step<'_> {
    fn apply(
        &self,
        x: Tensor<4>,
        skip: Option<Tensor<4>>,
        size: [usize; 2],
        env: &Env,
        hook: &mut dyn KvHook,
    ) -> Tensor<4> {
        match self {
            Step::Conv(conv) => conv.forward(x),
            Step::Resnet(resnet) => resnet.forward(x, Some(env.temb)),
            Step::SkipResnet(resnet) => {
                let x = match skip {
                    Some(skip) => Tensor::cat(vec![x, skip], 1),
                    None => x,
                };
                resnet.forward(x, Some(env.temb))
            }
            Step::Transformer(t, decoder) => t.forward(x, env.context, env.plan, hook, *decoder),
            Step::Upsample(conv) => conv.forward(upsample_nearest(x, size)),
            Step::Save | Step::Output => x,
        }
    }
}

/// Runs `steps` from `x`; returns the final `x` and the up block outputs. With `record`, every
/// computing step's input is kept there.
pub(super) fn walk(
    steps: &[Step],
    mut x: Tensor<4>,
    env: &Env,
    hook: &mut dyn KvHook,
    mut record: Option<&mut Vec<Saved>>,
) -> (Tensor<4>, Vec<Tensor<4>>) {
    let mut skips: Vec<Tensor<4>> = Vec::new();
    let mut outputs = Vec::new();
    for step in steps {
        match step {
            Step::Save => skips.push(x.clone()),
            Step::Output => outputs.push(x.clone()),
            _ => {
                let skip = match step {
                    Step::SkipResnet(_) => skips.pop(),
                    _ => None,
                };
                // Like diffusers' `upsample_size`: when a side was odd on the way down,
                // upsample to the size of the skip state the output will be joined with.
                let [_, _, h, w] = x.dims();
                let size = skips
                    .last()
                    .map(|s| [s.dims()[2], s.dims()[3]])
                    .unwrap_or([2 * h, 2 * w]);
                if let Some(record) = record.as_deref_mut() {
                    record.push(Saved {
                        x: x.clone(),
                        skip: skip.clone(),
                        size,
                    });
                }
                x = step.apply(x, skip, size, env, hook);
            }
        }
    }
    (x, outputs)
}

/// The guidance's truncated forward with every step input kept (without autodiff), so that
/// [`Unet::pull_back_features`] can recompute it one step at a time.
pub struct FeatureCheckpoints {
    saved: Vec<Saved>,
    features: Vec<Tensor<4>>,
    last_up: usize,
    temb: Tensor<2>,
    context: Tensor<3>,
}

impl FeatureCheckpoints {
    /// The up block outputs in f32, `features()[i]` is `up_blocks.i`.
    pub fn features(&self) -> &[Tensor<4>] {
        &self.features
    }
}

fn add(a: Option<Tensor<4>>, b: Option<Tensor<4>>) -> Option<Tensor<4>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

impl Unet {
    /// The steps up to and including up block `last_up`.
    pub(super) fn steps(&self, last_up: usize) -> Vec<Step<'_>> {
        let mut steps = vec![Step::Conv(&self.conv_in), Step::Save];
        for block in &self.down {
            block.steps(&mut steps);
        }
        if let Some(mid) = &self.mid {
            mid.steps(&mut steps);
        }
        for (i, block) in self.up.iter().enumerate().take(last_up + 1) {
            block.steps(i, &mut steps);
        }
        steps
    }

    /// [`up_block_features`](Self::up_block_features) for a latent without autodiff, keeping
    /// what [`pull_back_features`](Self::pull_back_features) needs: the input of every step,
    /// a few activations per block instead of a whole autodiff graph.
    pub fn checkpointed_features(
        &self,
        latent: Tensor<4>,
        timestep: f32,
        context: &Tensor<3>,
        last_up: usize,
    ) -> FeatureCheckpoints {
        let last_up = last_up.min(self.up.len() - 1);
        let latent = to_dtype(latent.without_autodiff(), self.dtype);
        let context = to_dtype(context.clone().without_autodiff(), self.dtype);
        let temb = self.time_embedding(timestep, latent.dims()[0], &latent.device());
        let env = Env {
            temb: &temb,
            context: &context,
            plan: &self.attention,
        };
        let mut saved = Vec::new();
        let steps = self.steps(last_up);
        let (_, outputs) = walk(&steps, latent, &env, &mut NoHook, Some(&mut saved));
        FeatureCheckpoints {
            saved,
            features: outputs
                .into_iter()
                .map(|x| to_dtype(x, DType::F32))
                .collect(),
            last_up,
            temb,
            context,
        }
    }

    /// The gradient with respect to the latent of a function of the features, given its
    /// gradients `grads[i]` at `features()[i]` (`None` where it does not depend on one). Walks
    /// the steps backwards, recomputing each from its kept input with autodiff (the
    /// transformers with their chunked attention backward), so only one step's graph is alive
    /// at a time. Returns f32, or `None` when no gradient reaches the latent.
    pub fn pull_back_features(
        &self,
        checkpoints: FeatureCheckpoints,
        mut grads: Vec<Option<Tensor<4>>>,
    ) -> Option<Tensor<4>> {
        let FeatureCheckpoints {
            mut saved,
            last_up,
            temb,
            context,
            ..
        } = checkpoints;
        let env = Env {
            temb: &temb,
            context: &context,
            plan: &self.attention,
        };
        grads.resize(last_up + 1, None);
        let mut g: Option<Tensor<4>> = None;
        // Gradients of the skip states, stacked in the order the forward took them off.
        let mut skip_grads: Vec<Option<Tensor<4>>> = Vec::new();
        for step in self.steps(last_up).iter().rev() {
            match step {
                Step::Output => {
                    let gi = grads.pop().flatten().map(|t| to_dtype(t, self.dtype));
                    g = add(g, gi);
                }
                Step::Save => g = add(g, skip_grads.pop().flatten()),
                _ => {
                    let s = saved
                        .pop()
                        .expect("the checkpointed forward kept one input per computing step");
                    let Some(gy) = g.take() else {
                        if s.skip.is_some() {
                            skip_grads.push(None);
                        }
                        continue;
                    };
                    g = Some(match (step, &s.skip) {
                        (Step::SkipResnet(_), Some(skip)) => {
                            let (gx, gs) = pullback2(&s.x, skip, gy, |x, skip| {
                                step.apply(x, Some(skip), s.size, &env, &mut NoHook)
                            });
                            skip_grads.push(Some(gs));
                            gx
                        }
                        (Step::Transformer(t, _), _) => t.pullback(&s.x, gy, &context, env.plan),
                        _ => pullback(&s.x, gy, |x| step.apply(x, None, s.size, &env, &mut NoHook)),
                    });
                }
            }
        }
        g.map(|g| to_dtype(g, DType::F32))
    }
}
