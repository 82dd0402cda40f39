//! Choosing where tensors live: the GPU through wgpu (Vulkan/Metal/DX12 natively, WebGPU in
//! the browser) or burn's pure-Rust CPU backend (flex).

use burn::tensor::{DType, Device};

use crate::error::{Error, Result};

/// burn's CPU backend: slow, but everywhere and exact enough for parity tests.
#[cfg(not(target_family = "wasm"))]
pub fn cpu() -> Device {
    Device::flex()
}

/// Which native graphics API to ask wgpu for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphicsApi {
    /// Vulkan on Linux and Windows, Metal on macOS.
    #[default]
    Native,
    Vulkan,
    Metal,
    Dx12,
    /// Let wgpu pick (may fall back to OpenGL, which has no f16).
    Any,
}

/// How the GPU's memory pool lays out its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolLayout {
    /// cubecl's native default: allocations carved out of shared pages.
    #[default]
    Shared,
    /// One page per allocation, in size buckets: what a wasm build (the browser) always gets,
    /// so that a native run can show the browser's footprint.
    Exclusive,
}

/// Opens the GPU natively. Without a usable adapter the error says so and names `--cpu`.
#[cfg(not(target_family = "wasm"))]
pub fn gpu(api: GraphicsApi) -> Result<Device> {
    gpu_with_pools(api, PoolLayout::Shared)
}

/// [`gpu`] with the given memory-pool layout.
#[cfg(not(target_family = "wasm"))]
pub fn gpu_with_pools(api: GraphicsApi, pools: PoolLayout) -> Result<Device> {
    use burn::tensor::wgpu::MemoryConfiguration;
    use burn::tensor::wgpu::WgpuBackend;
    let backend = match api {
        GraphicsApi::Native if cfg!(target_os = "macos") => WgpuBackend::Metal,
        GraphicsApi::Native | GraphicsApi::Vulkan => WgpuBackend::Vulkan,
        GraphicsApi::Metal => WgpuBackend::Metal,
        GraphicsApi::Dx12 => WgpuBackend::Dx12,
        GraphicsApi::Any => WgpuBackend::Auto,
    };
    let mut options = Device::wgpu_options().graphics_api(backend);
    if pools == PoolLayout::Exclusive {
        options = options.memory_config(MemoryConfiguration::ExclusivePages);
    }
    options
        .init()
        .map_err(|e| {
            Error::Device(format!(
                "no usable GPU was found ({e}). Install the GPU's Vulkan driver, or run on the CPU with --cpu (much slower)"
            ))
        })
}

/// The Vulkan device for the GPU tests (the library's own and the integration tests), opened
/// once per test process: two tests opening it at the same moment left one without an
/// adapter (it then skipped, unseen). `None`, with the reason printed, where this machine has
/// none or `DRAGONEDIT_SKIP_WGPU` is set; CI installs Mesa's lavapipe. Not for the product.
#[doc(hidden)]
#[cfg(not(target_family = "wasm"))]
pub fn test_gpu() -> Option<Device> {
    static DEVICE: std::sync::OnceLock<std::result::Result<Device, String>> =
        std::sync::OnceLock::new();
    let opened = DEVICE.get_or_init(|| {
        if std::env::var_os("DRAGONEDIT_SKIP_WGPU").is_some() {
            return Err("DRAGONEDIT_SKIP_WGPU is set".into());
        }
        std::panic::catch_unwind(|| gpu(GraphicsApi::Vulkan))
            .map_err(|_| "wgpu initialisation panicked".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
    });
    match opened {
        Ok(device) => Some(device.clone()),
        Err(reason) => {
            println!("SKIPPED wgpu test: {reason}");
            None
        }
    }
}

/// Opens the browser's WebGPU adapter. Call once per page, before creating any tensor.
pub async fn webgpu() -> Result<Device> {
    Device::wgpu_options().init_async().await.map_err(|e| {
        Error::Device(format!(
            "WebGPU is not available ({e}). Use a current Chrome or Edge with a GPU, or enable WebGPU in this browser"
        ))
    })
}

/// Whether `device` is a GPU driven natively (Vulkan/Metal/DX12), where burn runs with
/// autotune: not the CPU backend, and not the browser's WebGPU, which has no autotune. Only
/// cubecl devices report a memory pool, which tells the GPU from the CPU.
pub fn is_native_gpu(device: &Device) -> bool {
    cfg!(not(target_family = "wasm")) && device.memory_pool_report().is_some()
}

/// What a native GPU's kernels are compiled to, and whether its matrix products can use the
/// card's matrix cores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLanguage {
    /// cubecl's runtime name: `wgpu<wgsl>` (the browser's language), `wgpu<spirv>`.
    pub runtime: &'static str,
    /// Cooperative matrices (tensor cores), which only SPIR-V on Vulkan can ask for: the
    /// `spirv` build on a card whose driver offers them.
    pub matrix_cores: bool,
    /// The matrix-multiply shapes the driver offers and cubecl registered for its matrix
    /// products, as "a x b -> c, MxNxK"; empty without matrix cores. Which of them burn's
    /// matmul can use decides what the cores give, so the bench prints them.
    pub matrix_shapes: Vec<String>,
}

/// [`KernelLanguage`] of a native wgpu device; `None` for the CPU and the browser.
#[cfg(not(target_family = "wasm"))]
pub fn kernel_language(device: &Device) -> Option<KernelLanguage> {
    let client = wgpu_client(device)?;
    let shapes = &client.properties().features.matmul.cmma;
    Some(KernelLanguage {
        runtime: client.name(),
        matrix_cores: !shapes.is_empty(),
        matrix_shapes: shapes
            .iter()
            .map(|c| {
                format!(
                    "{:?} x {:?} -> {:?}, {}x{}x{}",
                    c.a_type, c.b_type, c.cd_type, c.m, c.n, c.k
                )
            })
            .collect(),
    })
}

/// The most bytes one GPU buffer may hold on `device` (WebGPU's storage-binding and buffer-size
/// limits, as the adapter grants them); `None` for the CPU, where only memory limits a tensor.
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    Some(wgpu_client(device)?.properties().memory.max_page_size)
}

/// cubecl's client of a wgpu device (native or the browser's); `None` for the CPU.
fn wgpu_client(device: &Device) -> Option<burn_cubecl::cubecl::client::Client> {
    let device = device.clone().without_autodiff();
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube @ burn_cubecl::CubeDevice::Wgpu(_)) => {
            Some(cube.client())
        }
        _ => None,
    }
}

/// The largest single allocation a native GPU has served since it opened, in bytes, over
/// the pools our tensors live in: the weights' buffers and the activations' shared pages or
/// the browser layout's one buffer per allocation. WebGPU's storage-binding limit applies to
/// this size. Not cubecl's dedicated allocations: its memory-bandwidth probe takes a 128 MiB
/// buffer there on a machine's first run. `None` for the CPU.
#[cfg(not(target_family = "wasm"))]
pub fn largest_allocation(device: &Device) -> Option<u64> {
    wgpu_client(device)?
        .memory_report(burn::cubecl::MemoryScope::Device)
        .streams
        .iter()
        .flat_map(|s| s.pools.dynamic.iter().chain([&s.pools.persistent]))
        .map(|p| p.largest_alloc)
        .max()
}

/// One size bucket of the browser's pool layout ([`PoolLayout::Exclusive`]): every
/// allocation up to `largest` bytes that no smaller bucket takes gets a buffer of its own here,
/// kept for reuse when freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBucket {
    /// The largest allocation the bucket serves, in bytes.
    pub largest: u64,
    /// Buffers held now, and the most held at once since the device opened.
    pub pages: u64,
    pub pages_peak: u64,
    /// Bytes the buffers hold, and the bytes live tensors use of them.
    pub reserved: u64,
    pub in_use: u64,
}

/// The buckets of a native GPU's pool in the browser's layout that ever held a buffer,
/// smallest first; empty in the native layout, `None` for the CPU. In that layout a bucket
/// keeps the most buffers it ever needed at once, so what the pool reserves is the sum of the
/// buckets' peaks rather than the most that was live at once: this says which sizes hold it.
#[cfg(not(target_family = "wasm"))]
pub fn pool_buckets(device: &Device) -> Option<Vec<PoolBucket>> {
    use burn::cubecl::MemoryPoolKind;
    let report = wgpu_client(device)?.memory_report(burn::cubecl::MemoryScope::Device);
    let mut buckets: Vec<PoolBucket> = report
        .streams
        .iter()
        .flat_map(|s| s.pools.dynamic.iter())
        .filter(|p| p.pages_peak > 0)
        .filter_map(|p| match p.kind {
            MemoryPoolKind::Exclusive { max_alloc_size } => Some(PoolBucket {
                largest: max_alloc_size,
                pages: p.pages,
                pages_peak: p.pages_peak,
                reserved: p.usage.bytes_reserved,
                in_use: p.usage.bytes_in_use,
            }),
            _ => None,
        })
        .collect();
    buckets.sort_by_key(|b| b.largest);
    Some(buckets)
}

/// Whether the device's pool gives every allocation a buffer of its own, kept in a size bucket
/// for reuse (the browser's layout; natively `--pools exclusive`). There, buffers freed by one
/// part of a step serve only requests of their bucket's size or smaller until they are handed
/// back ([`release_unused`]), so handing them back between parts of different sizes lowers
/// the footprint; natively the shared pages are reused by any size and gain nothing from it.
pub fn one_buffer_per_allocation(device: &Device) -> bool {
    #[cfg(target_family = "wasm")]
    {
        let _ = device;
        true
    }
    #[cfg(not(target_family = "wasm"))]
    {
        use burn::cubecl::MemoryPoolKind;
        wgpu_client(device).is_some_and(|client| {
            client
                .memory_report(burn::cubecl::MemoryScope::Device)
                .streams
                .iter()
                .flat_map(|s| s.pools.dynamic.iter())
                .any(|p| matches!(p.kind, MemoryPoolKind::Exclusive { .. }))
        })
    }
}

/// The compute dtype: f16 when asked for and the device has it, f32 otherwise.
pub fn compute_dtype(device: &Device, want_f16: bool) -> DType {
    if want_f16 && device.supports_dtype(DType::F16) {
        DType::F16
    } else {
        DType::F32
    }
}

/// Hands the device pool's free pages back to the driver. An edit's phases (VAE encode, UNet
/// passes, VAE decode) allocate activations of different sizes: kept, one phase's free pages
/// sit beside the next phase's, so the tab's or process's footprint becomes their sum rather
/// than the largest (in the browser each allocation has a page of its own, in size buckets that
/// one phase's tensors rarely share with another's). Only pages with nothing live are freed, and
/// burn runs queued work lazily, so call it after a read-back has run the phase's work.
pub fn release_unused(device: &Device) {
    device.memory_cleanup();
}

/// Runs `build` with every allocation it makes on `device` served from the pool's persistent
/// part, one buffer of its exact size per tensor, for tensors that live as long as the model:
/// otherwise the weights sit in the pool's dynamic pages, which the browser's layout rounds up
/// to size buckets (lavapipe, SD 1.5 in f16: 2959 MiB reserved for 2037 MiB of weights) and the
/// native one shares with the activations. What `build` allocates and drops is freed by the
/// next [`release_unused`]. On the CPU backend it simply runs `build`.
pub fn persistent<I: Send, O: Send>(device: &Device, input: I, build: impl Fn(I) -> O + Send) -> O {
    device.memory_persistent_allocations(input, build)
}

/// Copies a tensor's values to the host as f32. Asynchronous because a WebGPU read-back can only
/// be awaited (a blocking one panics on wasm, BURN.md §6).
pub async fn read_back<const D: usize>(t: burn::tensor::Tensor<D>) -> Result<Vec<f32>> {
    let device = t.device();
    t.into_data_async()
        .await
        .map_err(|e| match e {
            burn::tensor::ExecutionError::DevicePoisoned { reason } => {
                Error::DeviceLost(causes(&reason))
            }
            e => execution_failure(&e.to_string(), max_buffer_bytes(&device)),
        })?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Device(format!("cannot read a result back from the GPU: {e:?}")))
}

/// A failed computation's error, from the reason in cubecl's error chain: an allocation larger
/// than one buffer may be, or the GPU out of memory, get what to do about it (`limit`: the
/// device's most bytes in one buffer); anything else its causes, without headings or traces.
fn execution_failure(reason: &str, limit: Option<u64>) -> Error {
    let mib = |bytes: u64| bytes.div_ceil(1 << 20);
    if let Some(size) = number_after(reason, "can't allocate buffer of size: ") {
        let allowed = limit.map_or(String::new(), |l| format!(" ({} MiB on this GPU)", l >> 20));
        return Error::Device(format!(
            "the edit needed one GPU buffer of {} MiB, more than one buffer may hold{allowed}; lower the working resolution",
            mib(size)
        ));
    }
    if let Some(size) = number_after(reason, "out of device memory allocating ") {
        return Error::Device(format!(
            "the GPU ran out of memory (allocating {} MiB more); lower the working resolution, or close other programs and tabs that use the GPU",
            mib(size)
        ));
    }
    Error::Device(format!("the computation failed: {}", causes(reason)))
}

/// The number that follows `label` in `text`.
fn number_after(text: &str, label: &str) -> Option<u64> {
    let rest = &text[text.find(label)? + label.len()..];
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..digits].parse().ok()
}

/// An error chain's causes on one line, without its headings and backtraces: wgpu's
/// "Destroyed: Device was destroyed." arrives as "The device is poisoned\nCaused
/// by:\n  Destroyed: Device was destroyed.\nBacktrace:\n...".
fn causes(reason: &str) -> String {
    const HEADINGS: [&str; 4] = [
        "Caused by:",
        "The device is poisoned",
        "An error happened during execution",
        "No backtrace available",
    ];
    let lines: Vec<&str> = reason
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Backtrace") && !l.starts_with("Asked at:"))
        .filter(|l| !l.is_empty() && !HEADINGS.contains(l))
        .collect();
    match lines.join("; ").trim_end_matches('.') {
        "" => "no reason given".to_string(),
        r => r.to_string(),
    }
}

#[cfg(all(test, not(target_family = "wasm")))]
mod tests {
    use super::*;

    #[test]
    fn a_lost_devices_reason_is_its_cause_alone() {
        let reason = "The device is poisoned\nCaused by:\n  Destroyed: Device was destroyed.\nBacktrace:\nNo backtrace available";
        assert_eq!(causes(reason), "Destroyed: Device was destroyed");
        assert_eq!(causes("Lost: the driver reset"), "Lost: the driver reset");
        assert_eq!(causes("Backtrace:\nframe 1"), "no reason given");
    }

    #[test]
    fn a_failed_allocation_says_what_to_do() {
        // cubecl's chain for a 132 MiB tensor on lavapipe (128 MiB a buffer), as read back.
        let reason = "An error happened during execution\nCaused by:\n  Several failures at once\nCaused by:\n  The bytes were never written (failure #1, still claiming 2 buffer(s))\n  skipped `ReduceKernel`: it needed memory ManagedMemoryId { value: 0 }, which carried the failure\nCaused by:\n  An IO error happened\nCaused by:\n  can't allocate buffer of size: 138412032\nNo backtrace available\nAsked at:\nNo backtrace available";
        let err = execution_failure(reason, Some(128 << 20)).to_string();
        assert_eq!(
            err,
            "GPU: the edit needed one GPU buffer of 132 MiB, more than one buffer may hold (128 MiB on this GPU); lower the working resolution"
        );
        let err = execution_failure(
            "Caused by:\n  out of device memory allocating 1048577 bytes\nBacktrace",
            None,
        );
        assert!(
            err.to_string()
                .contains("ran out of memory (allocating 2 MiB more)"),
            "{err}"
        );
        let err = execution_failure(
            "An error happened during execution\nCaused by:\n  a kernel failed\nAsked at:\nframe",
            None,
        );
        assert_eq!(
            err.to_string(),
            "GPU: the computation failed: a kernel failed"
        );
    }

    #[test]
    fn the_largest_allocation_counts_the_weights_buffers() {
        assert_eq!(largest_allocation(&Device::flex()), None);
        let Some(device) = test_gpu() else {
            return;
        };
        // Larger than anything the other tests of this process allocate (im2col bands stop at
        // 64 MiB), so only the persistent pool, where weights live, can have served it; under
        // lavapipe's 128 MiB binding limit, which a kernel writing it must keep to.
        let bytes = 96usize << 20;
        let weight = persistent(&device, (), |()| {
            burn::tensor::Tensor::<1>::zeros([bytes / 4], &device)
        });
        // Reading it back makes sure it was made, whatever burn queued lazily.
        assert_eq!(weight.into_data().num_elements(), bytes / 4);
        let largest = largest_allocation(&device).expect("a GPU reports its pools");
        assert!(largest >= bytes as u64, "{largest} < {bytes}");
    }

    #[test]
    fn only_the_browsers_layout_keeps_a_buffer_per_allocation() {
        assert!(!one_buffer_per_allocation(&Device::flex()));
        let Some(device) = test_gpu() else {
            return;
        };
        // The tests' GPU has the native layout. The other layout needs a process of its own
        // (the device opens once per process); `bench --pools exclusive` shows it at work.
        assert!(!one_buffer_per_allocation(&device));
    }

    #[test]
    fn the_kernel_language_names_the_build_and_its_matrix_shapes() {
        assert_eq!(kernel_language(&Device::flex()), None);
        let Some(device) = test_gpu() else {
            return;
        };
        let language = kernel_language(&device).expect("a wgpu device has a kernel language");
        let want = if cfg!(feature = "spirv") {
            "wgpu<spirv>"
        } else {
            "wgpu<wgsl>"
        };
        assert_eq!(language.runtime, want);
        // Only SPIR-V asks the driver for cooperative matrices; a shape is listed exactly when
        // there are matrix cores, each as "a x b -> c, MxNxK".
        if !cfg!(feature = "spirv") {
            assert!(!language.matrix_cores);
        }
        assert_eq!(language.matrix_cores, !language.matrix_shapes.is_empty());
        for shape in &language.matrix_shapes {
            assert!(
                shape.contains(" -> ") && shape.matches('x').count() >= 4,
                "{shape}"
            );
        }
    }
}
