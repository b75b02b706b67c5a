//! Choosing where tensors live. burn picks the backend from the device at run time, so
//! the model code is the same on every device; only this parser knows the names.

use burn::tensor::Device;

use crate::error::{EngineError, Result};

/// Parses a `--device` value: `cpu` (burn's pure-Rust `flex` backend, the default),
/// `cuda[:N]` (builds with the `cuda` feature), or `wgpu` / `vulkan` (builds with the `wgpu`
/// feature; `vulkan` pins that API, `wgpu` lets wgpu pick Vulkan, Metal, DX12 or GL).
pub fn parse_device(name: &str) -> Result<Device> {
    // Unused in a build with every GPU feature.
    #[cfg_attr(all(feature = "cuda", feature = "wgpu"), allow(unused_variables))]
    let unavailable = |feature: &str| {
        EngineError::Device(
            name.into(),
            format!("this build of Lathe has no `{feature}` support; rebuild with `--features {feature}`"),
        )
    };
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let i: usize = i
                .parse()
                .map_err(|_| EngineError::Device(name.into(), format!("`{i}` is not a device index")))?;
            (k, Some(i))
        }
        None => (name, None),
    };
    match kind {
        "cpu" | "flex" => Ok(Device::flex()),
        "cuda" => {
            #[cfg(feature = "cuda")]
            {
                cuda(name, index.unwrap_or(0))
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = index;
                Err(unavailable("cuda"))
            }
        }
        "wgpu" | "vulkan" => {
            #[cfg(feature = "wgpu")]
            {
                use burn::tensor::wgpu::WgpuBackend;
                // burn's wgpu runtime initializes once per process; later calls reuse it.
                static WGPU: std::sync::OnceLock<(String, Result<Device, String>)> = std::sync::OnceLock::new();
                let (first, device) = WGPU.get_or_init(|| {
                    let options = Device::wgpu_options();
                    let options = if kind == "vulkan" { options.graphics_api(WgpuBackend::Vulkan) } else { options };
                    (kind.to_string(), options.init().map_err(|e| e.to_string()))
                });
                if first != kind {
                    return Err(EngineError::Device(
                        name.into(),
                        format!("this process already runs on `{first}`; one GPU API per process"),
                    ));
                }
                device
                    .clone()
                    .map_err(|e| EngineError::Device(name.into(), format!("no usable GPU adapter: {e}")))
            }
            #[cfg(not(feature = "wgpu"))]
            {
                let _ = kind;
                Err(unavailable("wgpu"))
            }
        }
        other => Err(EngineError::Device(
            name.into(),
            format!("unknown device kind `{other}`; use cpu, cuda[:N], wgpu or vulkan"),
        )),
    }
}

/// The kind of device a `--device` value names, as workers announce it and jobs need it:
/// `cpu` (also `flex`), `cuda` (`cuda:1` too) or `wgpu` (also `vulkan`, wgpu pinned to
/// Vulkan). Unknown names pass through unchanged ([`parse_device`] refuses them).
pub fn device_kind(name: &str) -> &str {
    match name.split(':').next().unwrap_or("cpu") {
        "flex" => "cpu",
        "vulkan" => "wgpu",
        kind => kind,
    }
}

/// How a device multiplies f32 matrices. burn-cubecl runs f32 matrix products on CUDA tensor
/// cores as TF32 (a 10-bit mantissa, about 5e-4 relative rounding per product) on GPUs that
/// have them (Ampere and later), as PyTorch does with `torch.backends.cuda.matmul.allow_tf32`;
/// the CPU and wgpu backends multiply in f32. Parity tolerances and model-FLOPs utilisation
/// are read against this, not against the tensors' storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    F32,
    Tf32,
}

impl MatmulPrecision {
    /// The precision of the device a `--device` value names (`cuda:1` → TF32).
    pub fn of(device_name: &str) -> Self {
        match device_kind(device_name) {
            "cuda" => Self::Tf32,
            _ => Self::F32,
        }
    }

    /// The largest logit difference from the CPU that a device of this precision may show, as
    /// a fraction of the largest logit. f32 differs from the CPU only in summation order; TF32
    /// rounds every product's inputs to 11 significant bits, which the H200 run measured at
    /// 1.1e-3 (135M, 30 layers) to 2.5e-3 (1.1B, 16 layers) of the largest logit.
    pub fn parity_tolerance(self) -> f32 {
        match self {
            Self::F32 => 1e-3,
            Self::Tf32 => 1e-2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
        }
    }
}

/// Bytes the memory pools of the GPU a `--device` value names hold now, reserved from the
/// driver (cubecl's pools keep the pages they grew to, so after a step this is that step's
/// high-water mark, as PyTorch's `max_memory_reserved` is). `None` where the device is not a
/// CUDA GPU: the CPU's memory is the process's resident set, and wgpu reports none.
pub fn gpu_reserved_bytes(device_name: &str) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device_kind(device_name) == "cuda" {
        let index = device_name.split_once(':').and_then(|(_, i)| i.parse().ok()).unwrap_or(0);
        let client = cubecl::Device::cuda(index).ok()?.client();
        return Some(client.memory_report(cubecl::MemoryScope::Device).usage().bytes_reserved);
    }
    let _ = device_name;
    None
}

/// A CUDA device that has run a kernel. cubecl starts the CUDA runtime on first use and
/// panics when the driver (`libcuda`), NVRTC (`libnvrtc`) or the CUDA headers it compiles
/// kernels against are missing; starting it here, on a two-element sum, turns that into an
/// error naming what is missing before any work is queued.
#[cfg(feature = "cuda")]
fn cuda(name: &str, index: usize) -> Result<Device> {
    use burn::tensor::{Tensor, TensorData};
    use std::collections::HashMap;
    use std::sync::Mutex;
    static STARTED: Mutex<Option<HashMap<usize, std::result::Result<(), String>>>> = Mutex::new(None);
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    let outcome = started.get_or_insert_with(HashMap::new).entry(index).or_insert_with(|| {
        let device = Device::cuda(index);
        // cubecl may panic on a thread of its own (the caller then sees only a closed
        // channel), so the hook records every panic's message, the first being the cause;
        // it also keeps the default hook from printing them as if the program had crashed.
        let seen = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
        let record = seen.clone();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.payload_as_str().unwrap_or("a panic without a message");
            record.lock().unwrap_or_else(|e| e.into_inner()).push(message.to_string());
        }));
        let sum = std::panic::catch_unwind(|| {
            let t = Tensor::<1>::from_data(TensorData::new(vec![1f32, 2.0], [2]), &device);
            (t.clone() + t).into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))
        });
        std::panic::set_hook(hook);
        let first_panic = seen.lock().unwrap_or_else(|e| e.into_inner()).first().cloned();
        let why = match sum {
            Ok(Ok(v)) if v == [2.0, 4.0] => return Ok(()),
            Ok(Ok(v)) => format!("a test sum came back wrong: {v:?}"),
            Ok(Err(e)) => e,
            Err(_) => first_panic.unwrap_or_else(|| "the CUDA runtime panicked".into()),
        };
        Err(format!(
            "CUDA did not start: {}. The `cuda` build needs an NVIDIA driver (libcuda.so.1), NVRTC \
             (libnvrtc.so) on the library path and the CUDA headers under $CUDA_PATH (default /usr/local/cuda)",
            why.trim_end_matches('.')
        ))
    });
    outcome.clone().map(|()| Device::cuda(index)).map_err(|why| EngineError::Device(name.into(), why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_or_explain() {
        assert!(parse_device("cpu").is_ok());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("unknown device kind `tpu`"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a device index"), "{err}");
    }

    #[test]
    fn cuda_multiplies_in_tf32_and_is_given_a_tolerance_for_it() {
        assert_eq!(MatmulPrecision::of("cuda:1"), MatmulPrecision::Tf32);
        assert_eq!(MatmulPrecision::of("cpu"), MatmulPrecision::F32);
        assert_eq!(MatmulPrecision::of("vulkan"), MatmulPrecision::F32);
        assert!(MatmulPrecision::Tf32.parity_tolerance() > MatmulPrecision::F32.parity_tolerance());
    }
}
