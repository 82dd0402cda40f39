//! Vector-Jacobian products by recomputation: run a small piece of the model again on fresh
//! autodiff leaves and pull a known output gradient back to its inputs. The guidance's
//! low-memory backward (`Unet::pull_back_features`) is a chain of these, so only one piece's
//! autodiff graph is alive at a time instead of the whole truncated UNet's.

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

/// `gᵀ ∂f/∂x` at `x`.
pub fn pullback<const D: usize, const E: usize>(
    x: &Tensor<D>,
    g: Tensor<E>,
    f: impl FnOnce(Tensor<D>) -> Tensor<E>,
) -> Tensor<D> {
    let x = leaf(x);
    let out = f(x.clone());
    let g = to_dtype(g, out.dtype());
    let grads = (out * g).sum().backward();
    grad_of(&x, &grads)
}

/// `gᵀ ∂f/∂a` and `gᵀ ∂f/∂b` at `(a, b)`.
pub fn pullback2<const D: usize, const E: usize>(
    a: &Tensor<D>,
    b: &Tensor<D>,
    g: Tensor<E>,
    f: impl FnOnce(Tensor<D>, Tensor<D>) -> Tensor<E>,
) -> (Tensor<D>, Tensor<D>) {
    let (a, b) = (leaf(a), leaf(b));
    let out = f(a.clone(), b.clone());
    let g = to_dtype(g, out.dtype());
    let grads = (out * g).sum().backward();
    (grad_of(&a, &grads), grad_of(&b, &grads))
}
