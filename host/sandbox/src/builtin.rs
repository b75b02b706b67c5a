//! The built-in plugins, compiled from `plugins/` by the build script and shipped inside
//! the binary.

include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));

/// The component bytes of a built-in plugin by name (`exact-match`, `token-f1`, ...).
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTIN_PLUGINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// The names of the built-in plugins, in the order they were built.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN_PLUGINS.iter().map(|(n, _)| *n)
}
