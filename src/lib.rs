//! dragonedit: drag-style photo editing with DragonDiffusion on Stable Diffusion 1.5, running on
//! the user's GPU through burn's wgpu backend (WebGPU in the browser, Vulkan/Metal/DX12
//! natively) or on the CPU.
//!
//! The engine (models, diffusion, weights) never touches the DOM, the file system or the
//! network; the browser shell (`web`, wasm32 only) and the native CLI own all I/O.

pub mod device;
pub mod diffusion;
pub mod edit;
pub mod error;
#[cfg(not(target_family = "wasm"))]
pub mod heap;
pub mod image;
#[cfg(not(target_family = "wasm"))]
pub mod launches;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod weights;

#[cfg(target_family = "wasm")]
pub mod web;

pub use error::{Error, Result};
pub use pipeline::StableDiffusion;
pub use progress::{Phase, Progress};
