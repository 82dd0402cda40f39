//! diffusers' `Attention` in the SD 1.5 UNet's transformer blocks: projections, the attention
//! core by whichever way the device and the plan say, and the hand-written pull-back through
//! both.

use burn::tensor::Tensor;

use crate::error::Result;
use crate::model::attention::{AttentionPlan, UnetAttention, attend_fused, unet_attention};
use crate::model::attention_choice::kernel_is_faster;
use crate::model::flash_attention::{attention_pull_back, flash_attention, runs_as_kernels};
use crate::model::nn::{Linear, StackedLinear};
use crate::weights::Loader;

/// diffusers' `Attention`: q/k/v projections and `to_out.0`. The projections that read the
/// same input are computed by one product: all three in self-attention, keys and values in
/// cross-attention. One launch where there were three or two, on a GPU that is bound by
/// launching kernels.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Cross-attention's queries; `None` in self-attention, where `stacked` computes them.
    to_q: Option<Linear>,
    /// q, k, v (self-attention) or k, v (cross-attention).
    stacked: StackedLinear,
    pub(super) to_out: Linear,
    heads: usize,
}

impl Attention {
    /// Self-attention when `context_dim` is `None`, else attention over a context of that
    /// width.
    pub fn load(
        w: &mut Loader,
        p: &str,
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let source = context_dim.unwrap_or(dim);
        let to_q = Linear::load(w, &format!("{p}.to_q"), dim, dim, qkv_bias)?;
        let to_k = Linear::load(w, &format!("{p}.to_k"), source, dim, qkv_bias)?;
        let to_v = Linear::load(w, &format!("{p}.to_v"), source, dim, qkv_bias)?;
        let (to_q, stacked) = match context_dim {
            None => (None, StackedLinear::stack(vec![to_q, to_k, to_v])),
            Some(_) => (Some(to_q), StackedLinear::stack(vec![to_k, to_v])),
        };
        Ok(Self {
            to_q,
            stacked,
            to_out: Linear::load(w, &format!("{p}.to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, n, c] = x.dims();
        x.reshape([b, n, self.heads, c / self.heads])
            .swap_dims(1, 2)
    }

    fn merge_heads(x: Tensor<4>) -> Tensor<3> {
        let [b, h, n, d] = x.dims();
        x.swap_dims(1, 2).reshape([b, n, h * d])
    }

    /// Queries of `x`, keys and values of `context` (or of `x` itself), `[B, N, C]`: slices
    /// of the stacked product.
    pub(super) fn project(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
    ) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        match &self.to_q {
            None => {
                debug_assert!(context.is_none(), "self-attention reads no context");
                let [q, k, v] = take(self.stacked.forward(x));
                (q, k, v)
            }
            Some(to_q) => {
                let source = context.cloned().unwrap_or_else(|| x.clone());
                let [k, v] = take(self.stacked.forward(source));
                (to_q.forward(x), k, v)
            }
        }
    }

    /// `gᵀ ∂projections/∂x` from [`core_pullback`](Self::core_pullback)'s gradients `[parts,
    /// rows, n, C]`: in self-attention q, k and v together, one batched product with the
    /// stacked weights and a sum; in cross-attention the queries' alone, since the keys and
    /// values read the constant text context, not `x`.
    pub(super) fn pull_back_projections(&self, g: Tensor<4>) -> Tensor<3> {
        let [parts, rows, n, c] = g.dims();
        match &self.to_q {
            Some(to_q) => to_q.pull_back(g.narrow(0, 0, 1).reshape([rows, n, c])),
            None => {
                let g = self.stacked.pull_back(g.reshape([parts, rows * n, c]));
                let width = g.dims()[2];
                g.reshape([rows, n, width])
            }
        }
    }

    /// Multi-head attention of projected `[B, N, C]` queries, keys and values, before `to_out`.
    pub(super) fn core(
        &self,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        plan: &AttentionPlan,
    ) -> Tensor<3> {
        match unet_attention(&q.device(), q.dims()[2] / self.heads) {
            UnetAttention::Kernel => flash_attention(q, k, v, self.heads),
            UnetAttention::Composed => self.composed(q, k, v, plan),
            UnetAttention::Timed => {
                let fused = |q, k, v| self.fused(q, k, v);
                if kernel_is_faster(&q, &k, &v, self.heads, fused) {
                    flash_attention(q, k, v, self.heads)
                } else {
                    fused(q, k, v)
                }
            }
        }
    }

    /// [`core`](Self::core) by burn's fused op.
    fn fused(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        self.by_heads(q, k, v, attend_fused)
    }

    /// [`core`](Self::core) through [`AttentionPlan::attend`].
    fn composed(
        &self,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        plan: &AttentionPlan,
    ) -> Tensor<3> {
        self.by_heads(q, k, v, |q, k, v| plan.attend(q, k, v, false))
    }

    /// `attend` of `[B, heads, N, d]` inputs applied to `[B, N, C]` tokens, the heads laid out
    /// and back.
    fn by_heads(
        &self,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        attend: impl FnOnce(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>,
    ) -> Tensor<3> {
        Self::merge_heads(attend(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
        ))
    }

    /// Gradients of [`core`](Self::core) with respect to q, k and v, `[3, rows, n, C]`, given
    /// its output `o` and the gradient `g` `[rows, n, C]` at it; with `keys` false only the
    /// queries', `[1, rows, n, C]`. `g` may have a multiple of the kept tensors' rows (one per
    /// energy). On a GPU the two kernels of [`attention_pull_back`] read the tokens where they
    /// stand; elsewhere the chunked recomputation ([`AttentionPlan::attend_pullback`]) lays
    /// them out by heads once for all rows and always computes all three.
    pub(super) fn core_pullback(
        &self,
        [q, k, v]: [Tensor<3>; 3],
        o: Tensor<3>,
        g: Tensor<3>,
        plan: &AttentionPlan,
        keys: bool,
    ) -> Tensor<4> {
        if runs_as_kernels(&q.device(), q.dims()[2] / self.heads) {
            return attention_pull_back(q, k, v, o, g, self.heads, keys);
        }
        let (gq, gk, gv) = plan.attend_pullback(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
            self.split_heads(o),
            self.split_heads(g),
        );
        let parts = if keys { vec![gq, gk, gv] } else { vec![gq] };
        Tensor::stack(parts.into_iter().map(Self::merge_heads).collect(), 0)
    }

    /// Attention of `x` `[B, N, C]` over `context` (or itself).
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
        plan: &AttentionPlan,
    ) -> Tensor<3> {
        let (q, k, v) = self.project(x, context);
        self.to_out.forward(self.core(q, k, v, plan))
    }
}

/// The outputs of a [`StackedLinear`] of `N` layers.
pub(super) fn take<const N: usize>(outputs: Vec<Tensor<3>>) -> [Tensor<3>; N] {
    outputs
        .try_into()
        .unwrap_or_else(|v: Vec<_>| panic!("{N} stacked layers, got {}", v.len()))
}
