//! Vector-Jacobian products of small pieces of the model, each on fresh autodiff leaves: a
//! [`Kept`] piece runs now and is pulled back later from its kept graph; [`pullback`] runs a
//! piece again (recomputation) and pulls it back at once. The guidance's low-memory backward
//! (`Unet::pull_back_features`) is a chain of these, so no autodiff graph spans the whole
//! truncated UNet, and no graph ever holds a self-attention score matrix.

use burn::tensor::Tensor;

use super::nn::to_dtype;

fn leaf<const D: usize>(x: &Tensor<D>) -> Tensor<D> {
    x.clone().without_autodiff().autodiff().require_grad()
}

fn grad_of<const D: usize>(leaf: &Tensor<D>, grads: &burn::tensor::Gradients) -> Tensor<D> {
    // No entry means the output does not depend on this input: its gradient is zero.
    leaf.grad(grads)
        .unwrap_or_else(|| leaf.clone().without_autodiff().zeros_like())
}

/// A piece `f(inputs)` that ran on autodiff leaves, with its graph kept for one pull-back.
pub struct Kept<const N: usize, const D: usize, const E: usize> {
    inputs: [Tensor<D>; N],
    out: Tensor<E>,
}

impl<const N: usize, const D: usize, const E: usize> Kept<N, D, E> {
    pub fn run(inputs: [&Tensor<D>; N], f: impl FnOnce([Tensor<D>; N]) -> Tensor<E>) -> Self {
        let inputs = inputs.map(leaf);
        let out = f(inputs.clone());
        Self { inputs, out }
    }

    /// The output without autodiff, to feed the next piece.
    pub fn output(&self) -> Tensor<E> {
        self.out.clone().without_autodiff()
    }

    /// `gᵀ ∂f/∂input` for each input, in order. Consumes the graph.
    pub fn pull_back(self, g: Tensor<E>) -> [Tensor<D>; N] {
        let g = to_dtype(g.without_autodiff(), self.out.dtype());
        let grads = (self.out * g).sum().backward();
        self.inputs.map(|x| grad_of(&x, &grads))
    }
}

/// `gᵀ ∂f/∂x` at `x`, by running `f` again.
pub fn pullback<const D: usize, const E: usize>(
    x: &Tensor<D>,
    g: Tensor<E>,
    f: impl FnOnce(Tensor<D>) -> Tensor<E>,
) -> Tensor<D> {
    let [gx] = Kept::run([x], |[x]| f(x)).pull_back(g);
    gx
}

/// `gᵀ ∂f/∂a` and `gᵀ ∂f/∂b` at `(a, b)`, by running `f` again.
pub fn pullback2<const D: usize, const E: usize>(
    a: &Tensor<D>,
    b: &Tensor<D>,
    g: Tensor<E>,
    f: impl FnOnce(Tensor<D>, Tensor<D>) -> Tensor<E>,
) -> (Tensor<D>, Tensor<D>) {
    let [ga, gb] = Kept::run([a, b], |[a, b]| f(a, b)).pull_back(g);
    (ga, gb)
}

/// `x` repeated along the batch axis to `rows` rows. The guidance's lean backward keeps its
/// checkpoints at the forward's batch of one and pulls back one cotangent row per energy: a
/// piece differentiated by autodiff then runs on the checkpoint widened to the cotangent's batch.
pub fn widen<const D: usize>(x: &Tensor<D>, rows: usize) -> Tensor<D> {
    let batch = x.dims()[0];
    if batch == rows {
        x.clone()
    } else {
        debug_assert_eq!(
            rows % batch,
            0,
            "a cotangent batch is a multiple of the forward's"
        );
        x.clone().repeat_dim(0, rows / batch)
    }
}

/// `x` ready to broadcast against a cotangent of `rows` rows: as it is when it has one row,
/// else [`widen`]ed. The closed-form pull-backs take their statistics at the kept rows only.
pub fn broadcast_rows<const D: usize>(x: &Tensor<D>, rows: usize) -> Tensor<D> {
    if x.dims()[0] == 1 {
        x.clone()
    } else {
        widen(x, rows)
    }
}

/// [`pullback`] at `x` widened to `g`'s batch.
pub fn pullback_wide<const D: usize, const E: usize>(
    x: &Tensor<D>,
    g: Tensor<E>,
    f: impl FnOnce(Tensor<D>) -> Tensor<E>,
) -> Tensor<D> {
    let x = widen(x, g.dims()[0]);
    pullback(&x, g, f)
}
