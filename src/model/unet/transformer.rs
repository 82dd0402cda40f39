//! Transformer2DModel and BasicTransformerBlock of the SD 1.5 UNet: self-attention, text
//! cross-attention and a GEGLU feed-forward, wrapped in GroupNorm and 1x1 projections.

use burn::tensor::{Tensor, activation::gelu};

use super::hooks::{DecoderAttention, KvHook};
use crate::error::Result;
use crate::model::attention::AttentionPlan;
use crate::model::nn::{Conv2d, ConvSpec, GroupNorm, LayerNorm, Linear};
use crate::weights::Loader;

/// diffusers' `Attention` with separate q/k/v projections and `to_out.0`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    pub fn load(
        w: &mut Loader,
        p: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            to_q: Linear::load(w, &format!("{p}.to_q"), dim, dim, qkv_bias)?,
            to_k: Linear::load(w, &format!("{p}.to_k"), context_dim, dim, qkv_bias)?,
            to_v: Linear::load(w, &format!("{p}.to_v"), context_dim, dim, qkv_bias)?,
            to_out: Linear::load(w, &format!("{p}.to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, n, c] = x.dims();
        x.reshape([b, n, self.heads, c / self.heads])
            .swap_dims(1, 2)
    }

    /// Attention of `x` `[B, N, C]` over `context` (or itself). A hook, when given, sees the
    /// projected K/V before the head split.
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<&Tensor<3>>,
        plan: &AttentionPlan,
        hook: Option<(&mut dyn KvHook, DecoderAttention)>,
    ) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let source = context.cloned().unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let mut k = self.to_k.forward(source.clone());
        let mut v = self.to_v.forward(source);
        if let Some((hook, layer)) = hook {
            (k, v) = hook.self_attention_kv(layer, k, v);
        }
        let out = plan.attend(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
            false,
        );
        let out = out.swap_dims(1, 2).reshape([b, n, c]);
        self.to_out.forward(out)
    }
}

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
            attn1: Attention::load(w, &format!("{p}.attn1"), dim, dim, heads, false)?,
            norm2: LayerNorm::load(w, &format!("{p}.norm2"), dim, 1e-5)?,
            attn2: Attention::load(w, &format!("{p}.attn2"), dim, context_dim, heads, false)?,
            norm3: LayerNorm::load(w, &format!("{p}.norm3"), dim, 1e-5)?,
            ff_in: Linear::load(w, &format!("{p}.ff.net.0.proj"), dim, inner * 2, true)?,
            ff_out: Linear::load(w, &format!("{p}.ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(
        &self,
        x: Tensor<3>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
        hook: Option<(&mut dyn KvHook, DecoderAttention)>,
    ) -> Tensor<3> {
        let x = self
            .attn1
            .forward(self.norm1.forward(x.clone()), None, plan, hook)
            + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context), plan, None)
            + x;
        let h = self.ff_in.forward(self.norm3.forward(x.clone()));
        let inner = h.dims()[2] / 2;
        let value = h.clone().narrow(2, 0, inner);
        let gate = h.narrow(2, inner, inner);
        self.ff_out.forward(value * gelu(gate)) + x
    }
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

    /// `decoder` names this transformer when it sits in the UNet decoder, so the KV hook sees it.
    pub fn forward(
        &self,
        x: Tensor<4>,
        context: &Tensor<3>,
        plan: &AttentionPlan,
        hook: &mut dyn KvHook,
        decoder: Option<(usize, usize)>,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let to_tokens = |x: Tensor<4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(x)),
            Projection::Linear(lin) => lin.forward(to_tokens(x)),
        };
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
        let from_tokens = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(from_tokens(tokens)),
            Projection::Linear(lin) => from_tokens(lin.forward(tokens)),
        };
        out + residual
    }
}
