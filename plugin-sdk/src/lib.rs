//! Write a Lathe plugin: implement one of [`Scorer`], [`Validator`], [`Formatter`] or
//! [`Judge`], add the matching `export_*!` line, and build with
//! `cargo build --target wasm32-wasip2 --release`. The result is a WebAssembly component
//! that implements the `lathe:plugin@0.1.0` world of its kind (`wit/v0.1/plugin.wit`).
//!
//! ```ignore
//! use lathe_plugin_sdk::{PluginInfo, Score, Scorer, Value};
//!
//! struct Contains;
//!
//! impl Scorer for Contains {
//!     fn info() -> PluginInfo {
//!         PluginInfo::new("contains", "0.1.0", "1 when the prediction contains the reference")
//!     }
//!     fn new(_config: &Value) -> Result<Self, String> {
//!         Ok(Contains)
//!     }
//!     fn score(&self, prediction: &str, reference: &str) -> Score {
//!         Score::of(if prediction.contains(reference) { 1.0 } else { 0.0 })
//!     }
//! }
//!
//! lathe_plugin_sdk::export_scorer!(Contains);
//! ```
//!
//! The plugin runs sandboxed: no files, no network, no environment, a memory cap and a
//! time limit per call. A panic fails only the call that panicked.

pub use serde_json::{self, Value, json};

#[doc(hidden)]
pub mod bindings {
    pub mod formatter {
        wit_bindgen::generate!({
            path: "wit/v0.1", world: "formatter",
            pub_export_macro: true, export_macro_name: "export_formatter_world",
            default_bindings_module: "lathe_plugin_sdk::bindings::formatter",
        });
    }
    pub mod validator {
        wit_bindgen::generate!({
            path: "wit/v0.1", world: "validator",
            pub_export_macro: true, export_macro_name: "export_validator_world",
            default_bindings_module: "lathe_plugin_sdk::bindings::validator",
        });
    }
    pub mod scorer {
        wit_bindgen::generate!({
            path: "wit/v0.1", world: "scorer",
            pub_export_macro: true, export_macro_name: "export_scorer_world",
            default_bindings_module: "lathe_plugin_sdk::bindings::scorer",
        });
    }
    pub mod judge {
        wit_bindgen::generate!({
            path: "wit/v0.1", world: "judge",
            pub_export_macro: true, export_macro_name: "export_judge_world",
            default_bindings_module: "lathe_plugin_sdk::bindings::judge",
        });
    }
}

/// What a plugin tells the host about itself.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    /// JSON Schema (draft 2020-12) of the configuration `new` accepts.
    pub config_schema: Value,
}

impl PluginInfo {
    /// Info with an empty-object configuration schema.
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            description: description.into(),
            config_schema: json!({"type": "object", "additionalProperties": false}),
        }
    }

    pub fn with_config_schema(mut self, schema: Value) -> Self {
        self.config_schema = schema;
        self
    }
}

/// For plugins without options: accepts `{}` (or nothing), names the first unexpected key.
pub fn no_options(config: &Value) -> Result<(), String> {
    match config.as_object() {
        Some(o) => match o.keys().next() {
            Some(k) => Err(format!("this plugin takes no options, got `{k}`")),
            None => Ok(()),
        },
        None if config.is_null() => Ok(()),
        None => Err("configuration must be an object".into()),
    }
}

/// A score in [0, 1] with optional per-field detail.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub value: f64,
    pub details: Vec<(String, f64)>,
}

impl Score {
    pub fn of(value: f64) -> Self {
        Self { value, details: Vec::new() }
    }
}

/// One way an output breaks the rules: where (a JSON pointer, `""` for the whole output)
/// and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chat(Vec<Message>),
    Completion { prompt: String, completion: String },
}

/// Which field of a raw record was wrong, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    pub score: f64,
    pub reason: String,
}

/// Compares a model's prediction with the reference.
pub trait Scorer: Sized + 'static {
    fn info() -> PluginInfo;
    /// Builds the scorer from its JSON configuration (once per instance).
    fn new(config: &Value) -> Result<Self, String>;
    fn score(&self, prediction: &str, reference: &str) -> Score;
    /// Just the value: override when it is cheaper than a full [`Score`].
    fn score_value(&self, prediction: &str, reference: &str) -> f64 {
        self.score(prediction, reference).value
    }
    /// Corpus-level metrics over a whole set; by default the mean score.
    fn aggregate(&self, pairs: &[(&str, &str)]) -> Vec<(String, f64)> {
        let n = pairs.len().max(1) as f64;
        let sum: f64 = pairs.iter().map(|(p, r)| self.score_value(p, r)).sum();
        vec![("mean".into(), sum / n)]
    }
}

/// Checks a model output.
pub trait Validator: Sized + 'static {
    fn info() -> PluginInfo;
    fn new(config: &Value) -> Result<Self, String>;
    fn validate(&self, output: &str) -> Result<(), Vec<Violation>>;
}

/// Turns a raw record into a training example.
pub trait Formatter: Sized + 'static {
    fn info() -> PluginInfo;
    fn new(config: &Value) -> Result<Self, String>;
    /// `record` is the parsed JSON record (the SDK reports invalid JSON itself).
    fn format(&self, record: &Value) -> Result<Example, FieldError>;
}

/// Builds an LLM-judge prompt and reads the judge model's verdict.
pub trait Judge: Sized + 'static {
    fn info() -> PluginInfo;
    fn new(config: &Value) -> Result<Self, String>;
    fn build_prompt(&self, input: &str, output: &str, reference: Option<&str>) -> Vec<Message>;
    fn parse_verdict(&self, answer: &str) -> Result<Judgment, String>;
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    pub fn parse_config(config: &str) -> Result<Value, String> {
        if config.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(config).map_err(|e| format!("configuration is not valid JSON: {e}"))
    }

    /// The strings of a text batch (`offsets` has one more entry than strings), lazily.
    /// Invalid UTF-8 or offsets read as empty strings rather than trapping.
    pub fn batch_iter<'a>(data: &'a [u8], offsets: &'a [u32]) -> impl Iterator<Item = &'a str> + 'a {
        offsets.windows(2).map(move |w| {
            data.get(w[0] as usize..w[1] as usize)
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or("")
        })
    }

    pub fn batch_strs<'a>(data: &'a [u8], offsets: &'a [u32]) -> Vec<&'a str> {
        batch_iter(data, offsets).collect()
    }
}

/// Glue shared by the export macros: an instance's plugin value, configured once.
#[doc(hidden)]
#[macro_export]
macro_rules! __instance_slot {
    ($ty:ty) => {
        thread_local! {
            static __LATHE_INSTANCE: ::std::cell::RefCell<Option<$ty>> = const { ::std::cell::RefCell::new(None) };
        }
        fn __lathe_configure(config: String) -> Result<(), String> {
            let value = $crate::__private::parse_config(&config)?;
            let plugin = <$ty>::new(&value)?;
            __LATHE_INSTANCE.with_borrow_mut(|slot| *slot = Some(plugin));
            Ok(())
        }
        fn __lathe_with<R>(f: impl FnOnce(&$ty) -> R) -> R {
            __LATHE_INSTANCE.with_borrow_mut(|slot| {
                if slot.is_none() {
                    *slot = Some(<$ty>::new(&$crate::json!({})).expect("the plugin needs a configuration"));
                }
            });
            __LATHE_INSTANCE.with_borrow(|slot| f(slot.as_ref().expect("configured above")))
        }
    };
}

/// Exports a [`Scorer`] as the component's `scorer` world.
#[macro_export]
macro_rules! export_scorer {
    ($ty:ty) => {
        const _: () = {
            use $crate::bindings::scorer as w;
            $crate::__instance_slot!($ty);
            struct __LatheExport;
            impl w::Guest for __LatheExport {
                fn info() -> w::Info {
                    let i = <$ty as $crate::Scorer>::info();
                    w::Info { name: i.name, version: i.version, kind: w::lathe::plugin::types::Kind::Scorer,
                        description: i.description, config_schema: i.config_schema.to_string() }
                }
                fn configure(config: String) -> Result<(), String> {
                    __lathe_configure(config)
                }
                fn score(prediction: String, reference: String) -> w::Score {
                    let s = __lathe_with(|p| $crate::Scorer::score(p, &prediction, &reference));
                    w::Score { value: s.value, details: s.details.into_iter()
                        .map(|(field, score)| w::FieldScore { field, score }).collect() }
                }
                fn score_batch(predictions: w::TextBatch, references: w::TextBatch) -> Vec<f64> {
                    let p = $crate::__private::batch_iter(&predictions.data, &predictions.offsets);
                    let r = $crate::__private::batch_iter(&references.data, &references.offsets);
                    __lathe_with(|s| p.zip(r).map(|(p, r)| $crate::Scorer::score_value(s, p, r)).collect())
                }
                fn aggregate(predictions: w::TextBatch, references: w::TextBatch) -> Vec<w::FieldScore> {
                    let p = $crate::__private::batch_strs(&predictions.data, &predictions.offsets);
                    let r = $crate::__private::batch_strs(&references.data, &references.offsets);
                    let pairs: Vec<(&str, &str)> = p.into_iter().zip(r).collect();
                    __lathe_with(|s| $crate::Scorer::aggregate(s, &pairs)).into_iter()
                        .map(|(field, score)| w::FieldScore { field, score }).collect()
                }
            }
            w::export_scorer_world!(__LatheExport with_types_in $crate::bindings::scorer);
        };
    };
}

/// Exports a [`Validator`] as the component's `validator` world.
#[macro_export]
macro_rules! export_validator {
    ($ty:ty) => {
        const _: () = {
            use $crate::bindings::validator as w;
            $crate::__instance_slot!($ty);
            struct __LatheExport;
            impl w::Guest for __LatheExport {
                fn info() -> w::Info {
                    let i = <$ty as $crate::Validator>::info();
                    w::Info { name: i.name, version: i.version, kind: w::lathe::plugin::types::Kind::Validator,
                        description: i.description, config_schema: i.config_schema.to_string() }
                }
                fn configure(config: String) -> Result<(), String> {
                    __lathe_configure(config)
                }
                fn validate(output: String) -> Result<(), Vec<w::Violation>> {
                    __lathe_with(|v| $crate::Validator::validate(v, &output)).map_err(|vs| {
                        vs.into_iter().map(|v| w::Violation { path: v.path, message: v.message }).collect()
                    })
                }
            }
            w::export_validator_world!(__LatheExport with_types_in $crate::bindings::validator);
        };
    };
}

/// Exports a [`Formatter`] as the component's `formatter` world.
#[macro_export]
macro_rules! export_formatter {
    ($ty:ty) => {
        const _: () = {
            use $crate::bindings::formatter as w;
            $crate::__instance_slot!($ty);
            struct __LatheExport;
            impl w::Guest for __LatheExport {
                fn info() -> w::Info {
                    let i = <$ty as $crate::Formatter>::info();
                    w::Info { name: i.name, version: i.version, kind: w::lathe::plugin::types::Kind::Formatter,
                        description: i.description, config_schema: i.config_schema.to_string() }
                }
                fn configure(config: String) -> Result<(), String> {
                    __lathe_configure(config)
                }
                fn format(record: String) -> Result<w::Example, w::FieldError> {
                    use w::lathe::plugin::types as t;
                    let value: $crate::Value = $crate::serde_json::from_str(&record).map_err(|e| w::FieldError {
                        field: String::new(), message: format!("the record is not valid JSON: {e}") })?;
                    match __lathe_with(|f| $crate::Formatter::format(f, &value)) {
                        Ok($crate::Example::Chat(msgs)) => Ok(t::Example::Chat(msgs.into_iter()
                            .map(|m| t::Message { role: m.role, content: m.content }).collect())),
                        Ok($crate::Example::Completion { prompt, completion }) =>
                            Ok(t::Example::Completion(t::PromptCompletion { prompt, completion })),
                        Err(e) => Err(w::FieldError { field: e.field, message: e.message }),
                    }
                }
            }
            w::export_formatter_world!(__LatheExport with_types_in $crate::bindings::formatter);
        };
    };
}

/// Exports a [`Judge`] as the component's `judge` world.
#[macro_export]
macro_rules! export_judge {
    ($ty:ty) => {
        const _: () = {
            use $crate::bindings::judge as w;
            $crate::__instance_slot!($ty);
            struct __LatheExport;
            impl w::Guest for __LatheExport {
                fn info() -> w::Info {
                    let i = <$ty as $crate::Judge>::info();
                    w::Info { name: i.name, version: i.version, kind: w::lathe::plugin::types::Kind::Judge,
                        description: i.description, config_schema: i.config_schema.to_string() }
                }
                fn configure(config: String) -> Result<(), String> {
                    __lathe_configure(config)
                }
                fn build_prompt(input: String, output: String, reference: Option<String>) -> Vec<w::Message> {
                    __lathe_with(|j| $crate::Judge::build_prompt(j, &input, &output, reference.as_deref()))
                        .into_iter().map(|m| w::Message { role: m.role, content: m.content }).collect()
                }
                fn parse_verdict(answer: String) -> Result<w::Judgment, String> {
                    __lathe_with(|j| $crate::Judge::parse_verdict(j, &answer))
                        .map(|j| w::Judgment { score: j.score, reason: j.reason })
                }
            }
            w::export_judge_world!(__LatheExport with_types_in $crate::bindings::judge);
        };
    };
}
