//! `dragonedit`: the native command-line shell over the engine (Vulkan/Metal/DX12, or the CPU).

#[cfg(not(target_family = "wasm"))]
mod app;
#[cfg(not(target_family = "wasm"))]
mod bench;
#[cfg(not(target_family = "wasm"))]
mod download;
#[cfg(not(target_family = "wasm"))]
mod edit;
#[cfg(not(target_family = "wasm"))]
mod run;

/// Counts heap bytes for `bench`'s peak heap column (two relaxed atomic adds per allocation).
#[cfg(not(target_family = "wasm"))]
#[global_allocator]
static ALLOCATOR: dragonedit::heap::CountingAlloc = dragonedit::heap::CountingAlloc;

#[cfg(not(target_family = "wasm"))]
fn main() -> anyhow::Result<()> {
    app::main()
}

/// The CLI is native only; on wasm32 the binary is empty so whole-package builds still work.
#[cfg(target_family = "wasm")]
fn main() {}
