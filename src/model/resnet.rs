//! ResnetBlock2D, shared by the UNet (with a time embedding) and the VAE (without).

use burn::tensor::Tensor;

use super::conv::{Conv2d, ConvSpec};
use super::nn::{GroupNorm, Linear};
use crate::error::Result;
use crate::weights::Loader;

/// `norm1 → SiLU → conv1 (+ time projection) → norm2 → SiLU → conv2`, plus a 1x1 shortcut
/// when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// Loaded with the block; the UNet then takes every block's into one layer
    /// ([`take_time_projection`](Self::take_time_projection)).
    time_emb_proj: Option<Linear>,
    /// Where this block's time projection sits in the UNet's combined one.
    time_slot: Option<TimeSlot>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale: f64,
}

/// Sizes of one resnet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub c_in: usize,
    pub c_out: usize,
    /// Time-embedding width, or `None` in the VAE.
    pub temb: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale: f64,
}

impl ResnetBlock {
    pub fn load(w: &mut Loader, p: &str, s: ResnetSpec) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), s.groups, s.c_in, s.eps)?,
            conv1: Conv2d::load(w, &format!("{p}.conv1"), ConvSpec::k3(s.c_in, s.c_out))?,
            time_emb_proj: match s.temb {
                Some(t) => Some(Linear::load(
                    w,
                    &format!("{p}.time_emb_proj"),
                    t,
                    s.c_out,
                    true,
                )?),
                None => None,
            },
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), s.groups, s.c_out, s.eps)?,
            conv2: Conv2d::load(w, &format!("{p}.conv2"), ConvSpec::k3(s.c_out, s.c_out))?,
            conv_shortcut: if s.c_in != s.c_out {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.conv_shortcut"),
                    ConvSpec::k1(s.c_in, s.c_out),
                )?)
            } else {
                None
            },
            time_slot: None,
            output_scale: s.output_scale,
        })
    }

    /// Hands this block's time projection to the UNet, which computes every block's at once
    /// (one matrix product per pass instead of 22); the block then reads columns
    /// `start..start + len` of [`TimeProjections`] as its own.
    pub fn take_time_projection(&mut self, start: usize) -> Option<Linear> {
        let proj = self.time_emb_proj.take()?;
        self.time_slot = Some(TimeSlot {
            start,
            len: proj.out_features(),
        });
        Some(proj)
    }

    /// The first half: `conv1(SiLU(norm1(x)))` plus the time projection, added in the
    /// convolution's kernel.
    fn first_half(&self, x: Tensor<4>, times: Option<&TimeProjections>) -> Tensor<4> {
        // A view: no copy, and no reshape between the product and the sum.
        let time = match (self.time_slot, times) {
            (Some(slot), Some(times)) => Some(times.0.clone().narrow(1, slot.start, slot.len)),
            _ => None,
        };
        let x = self.norm1.forward_silu(x);
        match time {
            Some(t) => self.conv1.forward_plus(x, t),
            None => self.conv1.forward(x),
        }
    }

    /// The rest, from the block input `x` and the first half's `h`. The skip is added in
    /// `conv2`'s kernel, flattened before the product is issued (a reshape between the two
    /// left the sum a kernel of its own).
    fn second_half(&self, x: Tensor<4>, h: Tensor<4>) -> Tensor<4> {
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let h = self.norm2.forward_silu(h);
        if self.output_scale == 1.0 {
            let [b, c, height, width] = skip.dims();
            self.conv2
                .forward_plus(h, skip.reshape([b, c, height * width]))
        } else {
            (skip + self.conv2.forward(h)) / self.output_scale
        }
    }

    pub fn forward(&self, x: Tensor<4>, times: Option<&TimeProjections>) -> Tensor<4> {
        let h = self.first_half(x.clone(), times);
        self.second_half(x, h)
    }

    /// Whether [`pull_back`](Self::pull_back) can pull every convolution back by hand.
    pub fn has_pull_back(&self) -> bool {
        self.conv1.has_pull_back()
            && self.conv2.has_pull_back()
            && self
                .conv_shortcut
                .as_ref()
                .is_none_or(Conv2d::has_pull_back)
    }

    /// The forward (without autodiff), keeping the two tensors [`pull_back`](Self::pull_back)
    /// needs: the input and the first half's output, each the size of one activation.
    pub fn trace(&self, x: Tensor<4>, times: Option<&TimeProjections>) -> (Tensor<4>, ResnetTrace) {
        let h = self.first_half(x.clone(), times);
        let out = self.second_half(x.clone(), h.clone());
        (out, ResnetTrace { x, h })
    }

    /// `gᵀ ∂block/∂x` from a [`trace`](Self::trace); `g` may have more rows than the traced
    /// input (one per energy). The convolutions are pulled back by hand, needing nothing kept;
    /// each norm with its SiLU in closed form from the kept tensor ([`GroupNorm::pull_back`]).
    /// `None` when a convolution has no hand-written pull-back (see
    /// [`has_pull_back`](Self::has_pull_back); never in SD 1.5's UNet).
    pub fn pull_back(&self, trace: ResnetTrace, g: Tensor<4>) -> Option<Tensor<4>> {
        let g = if self.output_scale == 1.0 {
            g
        } else {
            g / self.output_scale
        };
        let g_skip = match &self.conv_shortcut {
            Some(conv) => conv.pull_back(g.clone())?,
            None => g.clone(),
        };
        let g_act = self.conv2.pull_back(g)?;
        let g_h = self.norm2.pull_back(&trace.h, g_act, true, None);
        let g_act = self.conv1.pull_back(g_h)?;
        Some(self.norm1.pull_back(&trace.x, g_act, true, Some(g_skip)))
    }
}

#[derive(Debug, Clone, Copy)]
struct TimeSlot {
    start: usize,
    len: usize,
}

/// Every resnet's projection of a pass's time embedding, `[B, Σ c_out, 1]` side by side (see
/// [`ResnetBlock::take_time_projection`]).
#[derive(Debug, Clone)]
pub struct TimeProjections(pub Tensor<3>);

/// What [`ResnetBlock::pull_back`] needs of a forward.
pub struct ResnetTrace {
    x: Tensor<4>,
    h: Tensor<4>,
}
