//! Bindings for `lathe:plugin@0.1.0` (`plugin-sdk/wit/v0.1`), one `bindgen!` per world,
//! and the conversions from its types into the host's. A later WIT version gets a module
//! of its own beside this one.

use wasmtime::component::{InstancePre, Linker};

use crate::types::{self, Kind};

pub const VERSION: &str = "0.1.0";

pub mod formatter {
    wasmtime::component::bindgen!({ path: "../../plugin-sdk/wit/v0.1", world: "formatter" });
}

pub mod validator {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit/v0.1", world: "validator",
        with: { "lathe:plugin/types": super::formatter::lathe::plugin::types },
    });
}

pub mod scorer {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit/v0.1", world: "scorer",
        with: { "lathe:plugin/types": super::formatter::lathe::plugin::types },
    });
}

pub mod judge {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit/v0.1", world: "judge",
        with: { "lathe:plugin/types": super::formatter::lathe::plugin::types },
    });
}

pub use formatter::lathe::plugin::types as wit;

/// A pre-linked component of one of the worlds.
#[derive(Clone)]
pub enum WorldPre<T: 'static> {
    Formatter(formatter::FormatterPre<T>),
    Validator(validator::ValidatorPre<T>),
    Scorer(scorer::ScorerPre<T>),
    Judge(judge::JudgePre<T>),
}

impl<T: 'static> WorldPre<T> {
    /// The world whose exports (names and types) the component has, if any.
    pub fn detect(pre: &InstancePre<T>) -> Option<Self> {
        if let Ok(p) = scorer::ScorerPre::new(pre.clone()) {
            return Some(Self::Scorer(p));
        }
        if let Ok(p) = validator::ValidatorPre::new(pre.clone()) {
            return Some(Self::Validator(p));
        }
        if let Ok(p) = formatter::FormatterPre::new(pre.clone()) {
            return Some(Self::Formatter(p));
        }
        judge::JudgePre::new(pre.clone()).ok().map(Self::Judge)
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Formatter(_) => Kind::Formatter,
            Self::Validator(_) => Kind::Validator,
            Self::Scorer(_) => Kind::Scorer,
            Self::Judge(_) => Kind::Judge,
        }
    }
}

/// An instantiated component of one of the worlds.
pub enum World {
    Formatter(formatter::Formatter),
    Validator(validator::Validator),
    Scorer(scorer::Scorer),
    Judge(judge::Judge),
}

impl<T: 'static> WorldPre<T> {
    pub fn instantiate(&self, store: &mut wasmtime::Store<T>) -> wasmtime::Result<World> {
        Ok(match self {
            Self::Formatter(p) => World::Formatter(p.instantiate(store)?),
            Self::Validator(p) => World::Validator(p.instantiate(store)?),
            Self::Scorer(p) => World::Scorer(p.instantiate(store)?),
            Self::Judge(p) => World::Judge(p.instantiate(store)?),
        })
    }
}

impl World {
    pub fn call_info<T>(&self, store: &mut wasmtime::Store<T>) -> wasmtime::Result<wit::Info> {
        match self {
            World::Formatter(w) => w.call_info(store),
            World::Validator(w) => w.call_info(store),
            World::Scorer(w) => w.call_info(store),
            World::Judge(w) => w.call_info(store),
        }
    }

    pub fn call_configure<T>(&self, store: &mut wasmtime::Store<T>, config: &str) -> wasmtime::Result<Result<(), String>> {
        match self {
            World::Formatter(w) => w.call_configure(store, config),
            World::Validator(w) => w.call_configure(store, config),
            World::Scorer(w) => w.call_configure(store, config),
            World::Judge(w) => w.call_configure(store, config),
        }
    }
}

/// Nothing of the worlds needs host functions: plugins only export. The linker offers
/// WASI (with nothing granted), which Rust's standard library imports.
pub fn add_to_linker<T: wasmtime_wasi::WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)
}

impl From<wit::Kind> for Kind {
    fn from(k: wit::Kind) -> Self {
        match k {
            wit::Kind::Formatter => Kind::Formatter,
            wit::Kind::Validator => Kind::Validator,
            wit::Kind::Scorer => Kind::Scorer,
            wit::Kind::Judge => Kind::Judge,
        }
    }
}

impl From<wit::Score> for types::Score {
    fn from(s: wit::Score) -> Self {
        types::Score {
            value: s.value,
            details: s.details.into_iter().map(|d| (d.field, d.score)).collect(),
        }
    }
}

impl From<wit::Violation> for types::Violation {
    fn from(v: wit::Violation) -> Self {
        types::Violation { path: v.path, message: v.message }
    }
}

impl From<wit::Message> for types::Message {
    fn from(m: wit::Message) -> Self {
        types::Message { role: m.role, content: m.content }
    }
}

impl From<wit::Example> for types::Example {
    fn from(e: wit::Example) -> Self {
        match e {
            wit::Example::Chat(msgs) => types::Example::Chat(msgs.into_iter().map(Into::into).collect()),
            wit::Example::Completion(pc) => types::Example::Completion { prompt: pc.prompt, completion: pc.completion },
        }
    }
}

impl From<wit::FieldError> for types::FieldError {
    fn from(e: wit::FieldError) -> Self {
        types::FieldError { field: e.field, message: e.message }
    }
}

impl From<wit::Judgment> for types::Judgment {
    fn from(j: wit::Judgment) -> Self {
        types::Judgment { score: j.score, reason: j.reason }
    }
}

/// Packs strings into one buffer with offsets (the WIT `text-batch`).
pub fn text_batch<S: AsRef<str>>(items: &[S]) -> wit::TextBatch {
    let total: usize = items.iter().map(|s| s.as_ref().len()).sum();
    let mut data = Vec::with_capacity(total);
    let mut offsets = Vec::with_capacity(items.len() + 1);
    offsets.push(0);
    for s in items {
        data.extend_from_slice(s.as_ref().as_bytes());
        offsets.push(data.len() as u32);
    }
    wit::TextBatch { data, offsets }
}
