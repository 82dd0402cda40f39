//! Transformer2DModel and BasicTransformerBlock of the SD 1.5 UNet: self-attention, text
//! cross-attention (both `attention_layer.rs`) and a GEGLU feed-forward, wrapped in GroupNorm
//! and 1x1 projections.

use burn::tensor::{Tensor, activation::gelu};

use super::attention_layer::Attention;
use super::hooks::{DecoderAttention, KvHook};
use crate::error::Result;
use crate::model::attention::AttentionPlan;
use crate::model::conv::{Conv2d, ConvSpec};
use crate::model::nn::{GroupNorm, LayerNorm, Linear, to_dtype};
use crate::model::pullback::Kept;
use crate::weights::Loader;

/// `norm1 → attn1 (self) → norm2 → attn2 (text) → norm3 → GEGLU feed-forward`, each residual.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(w: &mut Loader, p: &str, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: LayerNorm::load(w, &format!("{p}.norm1"), dim, 1e-5)?,
            attn1: Attention::load(w, &format!("{p}.attn1"), dim, None, heads, false)?,
            norm2: LayerNorm::load(w, &format!("{p}.norm2"), dim, 1e-5)?,
            attn2: Attention::load(
                w,
                &format!("{p}.attn2"),
                dim,
                Some(context_dim),
                heads,
                false,
            )?,
            norm3: LayerNorm::load(w, &format!("{p}.norm3"), dim, 1e-5)?,
            ff_in: Linear::load(w, &format!("{p}.ff.net.0.proj"), dim, inner * 2, true)?,
            ff_out: Linear::load(w, &format!("{p}.ff.net.2"), inner, dim, true)?,
        })
    }

    /// Self-attention's projected q, k, v of the block input `x`.
    fn self_attention_inputs(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        self.attn1.project(self.norm1.forward(x), None)
    }

    /// Everything after the self-attention core `o`: its output projection and residual over
    /// the block input `x`, the text cross-attention, the feed-forward.
    fn after_self_attention(
        &self,
        o: Tensor<3>,
        x: Tensor<3>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
    ) -> Tensor<3> {
        let x = self.attn1.to_out.forward(o) + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context), plan)
            + x;
        let h = self.ff_in.forward(self.norm3.forward(x.clone()));
        self.ff_out.forward(geglu(h)) + x
    }

    fn forward(
        &self,
        x: Tensor<3>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
        hook: Option<(&mut dyn KvHook, DecoderAttention)>,
    ) -> Tensor<3> {
        let (q, k, v) = self.self_attention_inputs(x.clone());
        let mut core = |q, k, v| self.attn1.core(q, k, v, plan);
        let o = match hook {
            Some((hook, layer)) => hook.self_attention(layer, q, k, v, &mut core),
            None => core(q, k, v),
        };
        self.after_self_attention(o, x, context, plan)
    }

    /// Runs the block on `x` in three pieces for a later pull-back: the projections and the
    /// rest keep their autodiff graphs; the self-attention core runs without one, keeping its
    /// inputs and output, so no score matrix is ever held (its backward recomputes scores in
    /// chunks).
    fn trace(&self, x: &Tensor<3>, context: &Tensor<3>, plan: &AttentionPlan) -> BlockTrace {
        let projections = Kept::run([x], |[x]| {
            let (q, k, v) = self.self_attention_inputs(x);
            Tensor::cat(vec![q, k, v], 2)
        });
        let qkv = projections.output();
        let width = qkv.dims()[2] / 3;
        let qkv = [0, 1, 2].map(|i| qkv.clone().narrow(2, i * width, width));
        let [q, k, v] = qkv.clone();
        let o = self.attn1.core(q, k, v, plan);
        let rest = Kept::run([&o, x], |[o, x]| {
            self.after_self_attention(o, x, context, plan)
        });
        BlockTrace {
            projections,
            qkv,
            o,
            rest,
        }
    }

    /// `gᵀ ∂block/∂x` from a [`trace`](Self::trace) of the block at `x`.
    fn pull_back(&self, trace: BlockTrace, g: Tensor<3>, plan: &AttentionPlan) -> Tensor<3> {
        let [g_o, g_residual] = trace.rest.pull_back(g);
        let g_qkv = self
            .attn1
            .core_pullback(trace.qkv, trace.o, g_o, plan, true);
        let [_, rows, n, c] = g_qkv.dims();
        let side_by_side = (0..3).map(|i| g_qkv.clone().narrow(0, i, 1).reshape([rows, n, c]));
        let [g_projections] = trace
            .projections
            .pull_back(Tensor::cat(side_by_side.collect(), 2));
        g_residual + g_projections
    }
}

impl TransformerBlock {
    /// The forward at `x` (without autodiff), keeping what [`pull_back_lean`](Self::pull_back_lean)
    /// needs: the residual stream before each sub-layer, both attentions' queries, keys, values
    /// and outputs, and the feed-forward's inner activation; no score and no autodiff graph.
    fn trace_lean(
        &self,
        x: Tensor<3>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
    ) -> (Tensor<3>, LeanBlockTrace) {
        let (q, k, v) = self.self_attention_inputs(x.clone());
        let o = self.attn1.core(q.clone(), k.clone(), v.clone(), plan);
        let x1 = self.attn1.to_out.forward(o.clone()) + x.clone();
        let (q2, k2, v2) = self
            .attn2
            .project(self.norm2.forward(x1.clone()), Some(context));
        let o2 = self.attn2.core(q2.clone(), k2.clone(), v2.clone(), plan);
        let x2 = self.attn2.to_out.forward(o2.clone()) + x1.clone();
        let h = self.ff_in.forward(self.norm3.forward(x2.clone()));
        let out = self.ff_out.forward(geglu(h.clone())) + x2.clone();
        let trace = LeanBlockTrace {
            x,
            qkv: [q, k, v],
            o,
            x1,
            qkv2: [q2, k2, v2],
            o2,
            x2,
            h,
        };
        (out, trace)
    }

    /// `gᵀ ∂block/∂x` from a [`trace_lean`](Self::trace_lean); `g` may have more rows than the
    /// traced input. Everything is pulled back by hand: linear layers and attention cores,
    /// and the norms and the GEGLU in closed form from the kept tensors.
    fn pull_back_lean(&self, t: LeanBlockTrace, g: Tensor<3>, plan: &AttentionPlan) -> Tensor<3> {
        // Feed-forward.
        let g_inner = self.ff_out.pull_back(g.clone());
        let g_h = geglu_pull_back(&t.h, g_inner);
        let g_n3 = self.ff_in.pull_back(g_h);
        let g_x2 = self.norm3.pull_back(&t.x2, g_n3, Some(g));
        // Text cross-attention: the context is constant, so only the queries lead back.
        let g_o2 = self.attn2.to_out.pull_back(g_x2.clone());
        let g_q2 = self.attn2.core_pullback(t.qkv2, t.o2, g_o2, plan, false);
        let g_n2 = self.attn2.pull_back_projections(g_q2);
        let g_x1 = self.norm2.pull_back(&t.x1, g_n2, Some(g_x2));
        // Self-attention.
        let g_o = self.attn1.to_out.pull_back(g_x1.clone());
        let g_qkv = self.attn1.core_pullback(t.qkv, t.o, g_o, plan, true);
        let g_n1 = self.attn1.pull_back_projections(g_qkv);
        self.norm1.pull_back(&t.x, g_n1, Some(g_x1))
    }
}

/// `value · GELU(gate)` over the two halves of the feed-forward's inner projection.
fn geglu(h: Tensor<3>) -> Tensor<3> {
    let inner = h.dims()[2] / 2;
    let value = h.clone().narrow(2, 0, inner);
    let gate = h.narrow(2, inner, inner);
    value * gelu(gate)
}

/// `gᵀ ∂geglu/∂h` at `h` in closed form (`g` may have more rows than `h`): `g · GELU(gate)`
/// for the value half, `g · value · GELU'(gate)` for the gate half, with GELU'(x) = Φ(x) +
/// x φ(x) for burn's exact (erf) GELU.
fn geglu_pull_back(h: &Tensor<3>, g: Tensor<3>) -> Tensor<3> {
    let inner = h.dims()[2] / 2;
    let g = to_dtype(g, h.dtype());
    let value = h.clone().narrow(2, 0, inner);
    let gate = h.clone().narrow(2, inner, inner);
    let cdf = (gate.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() * 0.5 + 0.5;
    let pdf = (gate.clone().powi_scalar(2) * -0.5).exp()
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    let g_value = g.clone() * gate.clone() * cdf.clone();
    let g_gate = g * value * (cdf + gate * pdf);
    Tensor::cat(vec![g_value, g_gate], 2)
}

/// A transformer block's forward as [`TransformerBlock::pull_back_lean`] needs it.
struct LeanBlockTrace {
    x: Tensor<3>,
    qkv: [Tensor<3>; 3],
    o: Tensor<3>,
    x1: Tensor<3>,
    qkv2: [Tensor<3>; 3],
    o2: Tensor<3>,
    x2: Tensor<3>,
    h: Tensor<3>,
}

/// A Transformer2D's forward as [`Transformer2D::pull_back_lean`] needs it.
pub struct LeanTransformerTrace {
    x: Tensor<4>,
    blocks: Vec<LeanBlockTrace>,
}

/// One transformer block's forward as its pull-back needs it (see [`TransformerBlock::trace`]).
struct BlockTrace {
    projections: Kept<1, 3, 3>,
    qkv: [Tensor<3>; 3],
    o: Tensor<3>,
    rest: Kept<2, 3, 3>,
}

/// A Transformer2D's forward as its pull-back needs it: each piece's graph, and the
/// self-attention cores' inputs and outputs, but no score matrix.
pub struct TransformerTrace {
    enter: Kept<1, 4, 3>,
    blocks: Vec<BlockTrace>,
    exit: Kept<1, 3, 4>,
}

/// How the transformer enters and leaves the token layout (SD 1.x: 1x1 convs; SD 2.x: linear).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Transformer2DModel: GroupNorm, projection in, transformer blocks, projection out, residual.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

/// Sizes of one Transformer2DModel.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub context_dim: usize,
    pub heads: usize,
    pub groups: usize,
    pub layers: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn load(w: &mut Loader, p: &str, s: TransformerSpec) -> Result<Self> {
        let c = s.channels;
        let proj = |w: &mut Loader, name: &str| -> Result<Projection> {
            let key = format!("{p}.{name}");
            Ok(if s.linear_projection {
                Projection::Linear(Linear::load(w, &key, c, c, true)?)
            } else {
                Projection::Conv(Conv2d::load(w, &key, ConvSpec::k1(c, c))?)
            })
        };
        let norm = GroupNorm::load(w, &format!("{p}.norm"), s.groups, c, 1e-6)?;
        let proj_in = proj(w, "proj_in")?;
        let blocks = (0..s.layers)
            .map(|i| {
                TransformerBlock::load(
                    w,
                    &format!("{p}.transformer_blocks.{i}"),
                    c,
                    s.context_dim,
                    s.heads,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = proj(w, "proj_out")?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// GroupNorm and the projection into tokens `[B, H·W, C]`.
    fn enter(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, c, h, w] = x.dims();
        let x = self.norm.forward(x);
        let to_tokens = |x: Tensor<4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(x)),
            Projection::Linear(lin) => lin.forward(to_tokens(x)),
        }
    }

    /// The projection out of tokens back to `[B, C, H, W]` (before the residual).
    fn exit(&self, tokens: Tensor<3>, [b, c, h, w]: [usize; 4]) -> Tensor<4> {
        let from_tokens = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward(from_tokens(tokens)),
            Projection::Linear(lin) => from_tokens(lin.forward(tokens)),
        }
    }

    /// [`exit`](Self::exit) plus the residual `x`: with a convolution the sum runs in its
    /// kernel (the residual is flattened before the product is issued, so no reshape splits
    /// them).
    fn exit_plus(&self, tokens: Tensor<3>, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        match &self.proj_out {
            Projection::Conv(conv) => {
                let residual = x.reshape([b, c, h * w]);
                conv.forward_flat_plus(tokens.swap_dims(1, 2), [h, w], residual)
            }
            Projection::Linear(_) => self.exit(tokens, [b, c, h, w]) + x,
        }
    }

    /// `decoder` names this transformer when it sits in the UNet decoder, so the KV hook sees it.
    pub fn forward(
        &self,
        x: Tensor<4>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
        hook: &mut dyn KvHook,
        decoder: Option<(usize, usize)>,
    ) -> Tensor<4> {
        let mut tokens = self.enter(x.clone());
        for (layer, block) in self.blocks.iter().enumerate() {
            let hook_here = decoder.map(|(block, attention)| {
                (
                    &mut *hook as &mut dyn KvHook,
                    DecoderAttention {
                        block,
                        attention,
                        layer,
                    },
                )
            });
            tokens = block.forward(tokens, context, plan, hook_here);
        }
        self.exit_plus(tokens, x)
    }

    /// The forward at `x` (no hook: the guidance never replaces K/V), with what
    /// [`pull_back_trace`](Self::pull_back_trace) needs.
    pub fn trace(
        &self,
        x: &Tensor<4>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
    ) -> (Tensor<4>, TransformerTrace) {
        let dims = x.dims();
        let enter = Kept::run([x], |[x]| self.enter(x));
        let mut tokens = enter.output();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let trace = block.trace(&tokens, context, plan);
            tokens = trace.rest.output();
            blocks.push(trace);
        }
        let exit = Kept::run([&tokens], |[t]| self.exit(t, dims));
        let out = exit.output() + x.clone().without_autodiff();
        (
            out,
            TransformerTrace {
                enter,
                blocks,
                exit,
            },
        )
    }

    /// `gᵀ ∂transformer/∂x` from a [`trace`](Self::trace) at `x`.
    pub fn pull_back_trace(
        &self,
        trace: TransformerTrace,
        g: Tensor<4>,
        plan: &AttentionPlan,
    ) -> Tensor<4> {
        let [mut g_tokens] = trace.exit.pull_back(g.clone());
        for (block, piece) in self.blocks.iter().zip(trace.blocks).rev() {
            g_tokens = block.pull_back(piece, g_tokens, plan);
        }
        let [g_x] = trace.enter.pull_back(g_tokens);
        g_x + g
    }

    /// Whether [`pull_back_lean`](Self::pull_back_lean) can pull both projections back by hand.
    pub fn has_pull_back(&self) -> bool {
        [&self.proj_in, &self.proj_out].iter().all(|p| match p {
            Projection::Conv(conv) => conv.has_pull_back(),
            Projection::Linear(_) => true,
        })
    }

    /// The forward at `x` (without autodiff), with what
    /// [`pull_back_lean`](Self::pull_back_lean) needs.
    pub fn trace_lean(
        &self,
        x: Tensor<4>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
    ) -> (Tensor<4>, LeanTransformerTrace) {
        let mut tokens = self.enter(x.clone());
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (out, trace) = block.trace_lean(tokens, context, plan);
            tokens = out;
            blocks.push(trace);
        }
        let out = self.exit_plus(tokens, x.clone());
        (out, LeanTransformerTrace { x, blocks })
    }

    /// `gᵀ ∂transformer/∂x` from a [`trace_lean`](Self::trace_lean) at `x`; `g` may have more
    /// rows than `x`. `None` unless [`has_pull_back`](Self::has_pull_back).
    pub fn pull_back_lean(
        &self,
        trace: LeanTransformerTrace,
        g: Tensor<4>,
        plan: &AttentionPlan,
    ) -> Option<Tensor<4>> {
        let [b, c, h, w] = g.dims();
        let to_tokens = |x: Tensor<4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        let from_tokens = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let mut g_tokens = match &self.proj_out {
            Projection::Conv(conv) => to_tokens(conv.pull_back(g.clone())?),
            Projection::Linear(lin) => lin.pull_back(to_tokens(g.clone())),
        };
        for (block, piece) in self.blocks.iter().zip(trace.blocks).rev() {
            g_tokens = block.pull_back_lean(piece, g_tokens, plan);
        }
        let g_normed = match &self.proj_in {
            Projection::Conv(conv) => conv.pull_back(from_tokens(g_tokens))?,
            Projection::Linear(lin) => from_tokens(lin.pull_back(g_tokens)),
        };
        Some(self.norm.pull_back(&trace.x, g_normed, false, Some(g)))
    }

    /// `gᵀ ∂transformer/∂x` at `x`, running the forward again.
    pub fn pullback(
        &self,
        x: &Tensor<4>,
        g: Tensor<4>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
    ) -> Tensor<4> {
        let (_, trace) = self.trace(x, context, plan);
        self.pull_back_trace(trace, g, plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pullback::pullback_wide;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn geglu_pull_back_equals_autodiff() {
        let device = Device::flex();
        let wave = |shape: [usize; 3], seed: f32, amp: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| amp * (i as f32 * 0.37 + seed).sin())
                .collect();
            Tensor::<3>::from_data(TensorData::new(v, shape), &device)
        };
        // Gates over GELU's curved range (±3), one row pulled back with two cotangent rows.
        let h = wave([1, 5, 8], 0.4, 3.0);
        let g = wave([2, 5, 4], 1.3, 1.0);
        let want = pullback_wide(&h, g.clone(), geglu);
        let got = geglu_pull_back(&h, g);
        let scale = want.clone().abs().max().into_scalar::<f32>();
        let diff = (got - want).abs().max().into_scalar::<f32>() / scale;
        assert!(diff < 1e-5, "{diff}");
    }
}
