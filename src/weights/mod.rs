//! Weight files: the streaming safetensors reader and the mapping of diffusers keys onto modules.

pub mod loader;
pub mod reader;
pub mod safetensors;
pub mod source;

pub use loader::{Loader, TensorRead};
pub use reader::{HostTensor, SafetensorsReader};
pub use source::ByteSource;
#[cfg(not(target_family = "wasm"))]
pub use source::FileSource;
