//! Choosing where tensors live. burn picks the backend from the device at run time, so
//! the model code is the same on every device; only this parser knows the names.

use burn::tensor::Device;

use crate::error::{EngineError, Result};

/// Parses a `--device` value: `cpu` (burn's pure-Rust `flex` backend, the default),
/// `cuda[:N]` (builds with the `cuda` feature), or `wgpu` / `vulkan` (builds with the `wgpu`
/// feature; `vulkan` pins that API, `wgpu` lets wgpu pick Vulkan, Metal, DX12 or GL).
pub fn parse_device(name: &str) -> Result<Device> {
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
                Ok(Device::cuda(index.unwrap_or(0)))
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
}
