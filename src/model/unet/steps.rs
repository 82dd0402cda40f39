//! The UNet as a flat list of steps over one running tensor and a stack of skip states. The
//! forward walks it; the guidance's low-memory backward walks it in reverse, one step at a
//! time, from what the forward kept of each step ([`FeatureCheckpoints`]): its autodiff graph
//! without attention scores, or only its input, to run it again.

use burn::tensor::{DType, Tensor};

use super::transformer::{LeanTransformerTrace, Transformer2D, TransformerTrace};
use super::{KvHook, NoHook, Unet};
use crate::model::attention::AttentionPlan;
use crate::model::conv::Conv2d;
use crate::model::nn::{to_dtype, upsample_nearest};
use crate::model::pullback::{Kept, pullback, pullback_wide, pullback2, widen};
use crate::model::resnet::{ResnetBlock, ResnetTrace, TimeProjections};

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
    pub times: &'a TimeProjections,
    pub context: &'a Tensor<3>,
    pub plan: &'a AttentionPlan,
}

/// What the checkpointed forward keeps of each computing step for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The step's autodiff graph; a transformer's without its self-attention scores, which
    /// the backward recomputes in chunks. No step runs twice.
    Graphs,
    /// Only the step's input: the backward runs the step again, so only one step's graph is
    /// ever alive. About one more truncated forward of work for the least memory.
    Inputs,
    /// The few activations a hand-written pull-back of the step needs (no autodiff graph): the
    /// convolutions, linear layers and attention cores are pulled back by hand, the norms and
    /// activations in closed form (autodiff only for the upsamplers' interpolation). Nothing
    /// heavy runs twice.
    Lean,
}

/// What the checkpointed forward kept of one computing step.
pub(super) enum Saved {
    Input {
        x: Tensor<4>,
        skip: Option<Tensor<4>>,
        size: [usize; 2],
    },
    Graph(Kept<1, 4, 4>),
    /// A skip-joining resnet's graph, over `x` and the skip state.
    JoinGraph(Kept<2, 4, 4>),
    Transformer(Box<TransformerTrace>),
    /// A resnet's lean trace; `split` is the channel count of `x` when a skip state was joined.
    LeanResnet {
        trace: ResnetTrace,
        split: Option<usize>,
    },
    LeanTransformer(Box<LeanTransformerTrace>),
    /// A convolution step pulled back by hand, which needs nothing kept.
    LeanConv,
    /// An upsampler: its convolution pulled back by hand, then the upsampling by autodiff at
    /// the kept input.
    LeanUpsample {
        x: Tensor<4>,
        size: [usize; 2],
    },
}

/// `x` with the skip state joined along the channels, when there is one.
fn join(x: Tensor<4>, skip: Option<Tensor<4>>) -> Tensor<4> {
    match skip {
        Some(skip) => Tensor::cat(vec![x, skip], 1),
        None => x,
    }
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
            Step::Resnet(resnet) => resnet.forward(x, Some(env.times)),
            Step::SkipResnet(resnet) => resnet.forward(join(x, skip), Some(env.times)),
            Step::Transformer(t, decoder) => t.forward(x, env.context, env.plan, hook, *decoder),
            Step::Upsample(conv) => conv.forward(upsample_nearest(x, size)),
            Step::Save | Step::Output => x,
        }
    }

    /// [`apply`](Self::apply) (without a hook, without autodiff), keeping what its lean
    /// pull-back needs ([`Keep::Lean`]).
    fn keep_lean(
        &self,
        x: Tensor<4>,
        skip: Option<Tensor<4>>,
        size: [usize; 2],
        env: &Env,
    ) -> (Tensor<4>, Saved) {
        match self {
            Step::Resnet(resnet) | Step::SkipResnet(resnet) if resnet.has_pull_back() => {
                let split = skip.as_ref().map(|_| x.dims()[1]);
                let (out, trace) = resnet.trace(join(x, skip), Some(env.times));
                (out, Saved::LeanResnet { trace, split })
            }
            Step::Transformer(t, _) if t.has_pull_back() => {
                let (out, trace) = t.trace_lean(x, env.context, env.plan);
                (out, Saved::LeanTransformer(Box::new(trace)))
            }
            Step::Conv(conv) if conv.has_pull_back() => (conv.forward(x), Saved::LeanConv),
            Step::Upsample(conv) if conv.has_pull_back() => {
                let out = self.apply(x.clone(), None, size, env, &mut NoHook);
                (out, Saved::LeanUpsample { x, size })
            }
            // A strided convolution, or any step with a convolution that has no hand-written
            // pull-back: its input, to run again.
            _ => {
                let saved = Saved::Input {
                    x: x.clone(),
                    skip: skip.clone(),
                    size,
                };
                (self.apply(x, skip, size, env, &mut NoHook), saved)
            }
        }
    }

    /// [`apply`](Self::apply) (without a hook), keeping what its pull-back needs.
    fn keep(
        &self,
        x: Tensor<4>,
        skip: Option<Tensor<4>>,
        size: [usize; 2],
        env: &Env,
    ) -> (Tensor<4>, Saved) {
        match (self, skip) {
            (Step::Transformer(t, _), _) => {
                let (out, trace) = t.trace(&x, env.context, env.plan);
                (out, Saved::Transformer(Box::new(trace)))
            }
            (_, Some(skip)) => {
                let kept = Kept::run([&x, &skip], |[x, skip]| {
                    self.apply(x, Some(skip), size, env, &mut NoHook)
                });
                (kept.output(), Saved::JoinGraph(kept))
            }
            (_, None) => {
                let kept = Kept::run([&x], |[x]| self.apply(x, None, size, env, &mut NoHook));
                (kept.output(), Saved::Graph(kept))
            }
        }
    }
}

/// Runs `steps` from `x`; returns the final `x` and the up block outputs. With `record`, what
/// the backward needs of every computing step is kept there.
pub(super) fn walk(
    steps: &[Step],
    mut x: Tensor<4>,
    env: &Env,
    hook: &mut dyn KvHook,
    mut record: Option<(&mut Vec<Saved>, Keep)>,
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
                x = match record.as_mut() {
                    None => step.apply(x, skip, size, env, hook),
                    Some((saved, Keep::Inputs)) => {
                        saved.push(Saved::Input {
                            x: x.clone(),
                            skip: skip.clone(),
                            size,
                        });
                        step.apply(x, skip, size, env, hook)
                    }
                    Some((saved, Keep::Graphs)) => {
                        let (out, kept) = step.keep(x, skip, size, env);
                        saved.push(kept);
                        out
                    }
                    Some((saved, Keep::Lean)) => {
                        let (out, kept) = step.keep_lean(x, skip, size, env);
                        saved.push(kept);
                        out
                    }
                };
            }
        }
    }
    (x, outputs)
}

/// The guidance's truncated forward with what [`Unet::pull_back_features`] needs of every step.
pub struct FeatureCheckpoints {
    saved: Vec<Saved>,
    features: Vec<Tensor<4>>,
    last_up: usize,
    times: TimeProjections,
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
    /// what [`pull_back_features`](Self::pull_back_features) needs of every step: its graph
    /// without attention scores, or only its input.
    pub fn checkpointed_features(
        &self,
        latent: Tensor<4>,
        timestep: f32,
        context: &Tensor<3>,
        last_up: usize,
        keep: Keep,
    ) -> FeatureCheckpoints {
        let last_up = last_up.min(self.up.len() - 1);
        let latent = to_dtype(latent.without_autodiff(), self.dtype);
        let context = to_dtype(context.clone().without_autodiff(), self.dtype);
        let times = self.time_embedding(timestep, latent.dims()[0], &latent.device());
        let env = Env {
            times: &times,
            context: &context,
            plan: &self.attention,
        };
        let mut saved = Vec::new();
        let steps = self.steps(last_up);
        let (_, outputs) = walk(&steps, latent, &env, &mut NoHook, Some((&mut saved, keep)));
        FeatureCheckpoints {
            saved,
            features: outputs
                .into_iter()
                .map(|x| to_dtype(x, DType::F32))
                .collect(),
            last_up,
            times,
            context,
        }
    }

    /// The gradient with respect to the latent of a function of the features, given its
    /// gradients `grads[i]` at `features()[i]` (`None` where it does not depend on one). With
    /// [`Keep::Lean`] or [`Keep::Inputs`] the gradients may have a multiple of the forward's
    /// rows (one row per energy, all at the same forward): each row comes back on its own. Walks
    /// the steps backwards from what the forward kept: a step's graph, its lean trace, or its
    /// input to run it again with autodiff, so at most one step's graph is built at a time.
    /// Returns f32, or `None` when no gradient reaches the latent.
    pub fn pull_back_features(
        &self,
        checkpoints: FeatureCheckpoints,
        mut grads: Vec<Option<Tensor<4>>>,
    ) -> Option<Tensor<4>> {
        let FeatureCheckpoints {
            mut saved,
            last_up,
            times,
            context,
            ..
        } = checkpoints;
        let env = Env {
            times: &times,
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
                    let kept = saved
                        .pop()
                        .expect("the checkpointed forward kept one entry per computing step");
                    let Some(gy) = g.take() else {
                        if matches!(
                            kept,
                            Saved::JoinGraph(_)
                                | Saved::Input { skip: Some(_), .. }
                                | Saved::LeanResnet { split: Some(_), .. }
                        ) {
                            skip_grads.push(None);
                        }
                        continue;
                    };
                    let rows = gy.dims()[0];
                    g = Some(match kept {
                        Saved::LeanResnet { trace, split } => {
                            let (Step::Resnet(resnet) | Step::SkipResnet(resnet)) = step else {
                                unreachable!("a resnet trace belongs to a resnet step")
                            };
                            let g_in = resnet
                                .pull_back(trace, gy)
                                .expect("kept as LeanResnet only when it has a pull-back");
                            match split {
                                Some(c) => {
                                    let total = g_in.dims()[1];
                                    skip_grads.push(Some(g_in.clone().narrow(1, c, total - c)));
                                    g_in.narrow(1, 0, c)
                                }
                                None => g_in,
                            }
                        }
                        Saved::LeanTransformer(trace) => match step {
                            Step::Transformer(t, _) => t
                                .pull_back_lean(*trace, gy, env.plan)
                                .expect("kept as LeanTransformer only when it has a pull-back"),
                            _ => unreachable!("a transformer trace belongs to a transformer step"),
                        },
                        Saved::LeanConv => match step {
                            Step::Conv(conv) => conv
                                .pull_back(gy)
                                .expect("kept as LeanConv only when it has a pull-back"),
                            _ => unreachable!("a convolution trace belongs to a convolution step"),
                        },
                        Saved::LeanUpsample { x, size } => match step {
                            Step::Upsample(conv) => {
                                let g_up = conv
                                    .pull_back(gy)
                                    .expect("kept as LeanUpsample only when it has a pull-back");
                                pullback_wide(&x, g_up, |x| upsample_nearest(x, size))
                            }
                            _ => unreachable!("an upsampler trace belongs to an upsampler step"),
                        },
                        Saved::Graph(kept) => {
                            let [gx] = kept.pull_back(gy);
                            gx
                        }
                        Saved::JoinGraph(kept) => {
                            let [gx, gs] = kept.pull_back(gy);
                            skip_grads.push(Some(gs));
                            gx
                        }
                        Saved::Transformer(trace) => match step {
                            Step::Transformer(t, _) => t.pull_back_trace(*trace, gy, env.plan),
                            _ => unreachable!("a transformer trace belongs to a transformer step"),
                        },
                        Saved::Input {
                            x,
                            skip: Some(skip),
                            size,
                        } => {
                            let (x, skip) = (widen(&x, rows), widen(&skip, rows));
                            let (gx, gs) = pullback2(&x, &skip, gy, |x, skip| {
                                step.apply(x, Some(skip), size, &env, &mut NoHook)
                            });
                            skip_grads.push(Some(gs));
                            gx
                        }
                        Saved::Input {
                            x,
                            skip: None,
                            size,
                        } => {
                            let x = widen(&x, rows);
                            match step {
                                Step::Transformer(t, _) => {
                                    t.pullback(&x, gy, &widen(&context, rows), env.plan)
                                }
                                _ => pullback(&x, gy, |x| {
                                    step.apply(x, None, size, &env, &mut NoHook)
                                }),
                            }
                        }
                    });
                }
            }
        }
        g.map(|g| to_dtype(g, DType::F32))
    }
}
