//! tokentop: "top for tokens", a terminal chat client for local GGUF models that shows the
//! real speed (decode tok/s, TTFT, prefill rate, memory, power) as the answer streams.

pub mod app;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod engine;
pub mod offline;
pub mod perplexity;
pub mod private;
pub mod protocol;
pub mod remote;
pub mod roofline;
pub mod session;
pub mod state;
pub mod stats;
pub mod telemetry;
pub mod theme;
pub mod think;
pub mod top;
pub mod ui;
