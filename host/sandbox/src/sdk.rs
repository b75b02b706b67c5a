//! The guest SDK this host was built with, carried in the binary: `lathe plugin new` writes it
//! into each new crate, so a plugin builds wherever it lives, with no Lathe checkout.
//!
//! One entry per accepted WIT version ([`ACCEPTED_WIT_VERSIONS`](crate::runtime::ACCEPTED_WIT_VERSIONS));
//! the files are those of `plugin-sdk/` at build time.

use std::path::Path;

/// The SDK crate for one WIT version: its files, as paths relative to the crate's root.
pub struct Sdk {
    /// The `lathe:plugin` package version its bindings target.
    pub wit_version: &'static str,
    pub files: &'static [(&'static str, &'static str)],
    /// The WIT file, one of `files`.
    pub wit: &'static str,
    /// A Python starting point per world (`scorer`, ...), built with componentize-py;
    /// `__NAME__` stands for the plugin's name.
    pub python_templates: &'static [(&'static str, &'static str)],
}

macro_rules! sdk_file {
    ($path:literal) => {
        ($path, include_str!(concat!("../../../plugin-sdk/", $path)))
    };
}

/// Every SDK this binary carries, oldest first.
pub const SDKS: &[Sdk] = &[Sdk {
    wit_version: crate::v0_1::VERSION,
    files: &[
        sdk_file!("Cargo.toml"),
        sdk_file!("README.md"),
        sdk_file!("src/lib.rs"),
        sdk_file!("wit/v0.1/plugin.wit"),
    ],
    wit: "wit/v0.1/plugin.wit",
    python_templates: &[
        sdk_file!("python/scorer.py"),
        sdk_file!("python/validator.py"),
        sdk_file!("python/formatter.py"),
        sdk_file!("python/judge.py"),
    ],
}];

/// The SDK for the newest WIT version this host accepts.
pub fn latest() -> &'static Sdk {
    SDKS.last().expect("the host carries at least one SDK")
}

impl Sdk {
    /// The WIT file's text.
    pub fn wit_text(&self) -> &'static str {
        self.files.iter().find(|(p, _)| *p == self.wit).map(|(_, t)| *t).expect("the WIT file is one of the SDK's files")
    }

    /// The Python template for `world`, with `name` filled in.
    pub fn python_template(&self, world: &str, name: &str) -> Option<String> {
        let file = format!("python/{world}.py");
        self.python_templates.iter().find(|(p, _)| *p == file).map(|(_, t)| t.replace("__NAME__", name))
    }

    /// Writes the SDK crate into `dir`, as a member of the workspace of the crate around it
    /// (the checkout's copy is a workspace of its own; here that line is dropped).
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        for (path, text) in self.files {
            let dest = dir.join(path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let text = if *path == "Cargo.toml" { text.replace("\n[workspace]\n", "\n") } else { text.to_string() };
            std::fs::write(&dest, text)?;
        }
        Ok(())
    }
}
