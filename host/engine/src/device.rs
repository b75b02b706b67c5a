//! Choosing where tensors live. burn picks the backend from the device at run time, so
//! the model code is the same on every device; only this parser knows the names.

use burn::tensor::Device;

use crate::error::{EngineError, Result};

/// Parses a `--device` value: `cpu` (burn's pure-Rust `flex` backend, the default),
/// `cuda[:N]` (builds with the `cuda` feature) or `wgpu` (builds with the `wgpu` feature).
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
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            {
                Device::wgpu_options()
                    .init()
                    .map_err(|e| EngineError::Device(name.into(), format!("no usable GPU adapter: {e}")))
            }
            #[cfg(not(feature = "wgpu"))]
            {
                Err(unavailable("wgpu"))
            }
        }
        other => Err(EngineError::Device(
            name.into(),
            format!("unknown device kind `{other}`; use cpu, cuda[:N] or wgpu"),
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
