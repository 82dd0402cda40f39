//! ResnetBlock2D, shared by the UNet (with a time embedding) and the VAE (without).

use burn::tensor::Tensor;

use super::nn::{Conv2d, ConvSpec, GroupNorm, Linear, silu};
use crate::error::Result;
use crate::weights::Loader;

/// `norm1 → SiLU → conv1 (+ time projection) → norm2 → SiLU → conv2`, plus a 1x1 shortcut
/// when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
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
            output_scale: s.output_scale,
        })
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(silu(temb.clone()));
            let [b, c] = t.dims();
            h = h + t.reshape([b, c, 1, 1]);
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = skip + h;
        if self.output_scale == 1.0 {
            out
        } else {
            out / self.output_scale
        }
    }
}
