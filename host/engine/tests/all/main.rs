//! The engine's integration tests, one binary (see STYLE.md: one link instead of many).

mod common;
mod errors;
mod paged;
mod sentencepiece;
mod smollm2;
mod tiny;
mod train;
