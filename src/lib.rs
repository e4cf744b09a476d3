//! Kiln: a distributed build farm and CI system.
//!
//! This crate is the program: the gRPC edge and everything that talks over the network. The
//! engine it drives lives in the `kiln-*` crates, which know nothing of gRPC.
//!
//! - [`proto`]: the generated `kiln.v1` types and the descriptor set for reflection.
//! - [`convert`]: the one place wire types become domain types and back.
//! - [`dispatcher`]: the dispatcher engine (crate `kiln-dispatcher`: submit, scheduling, runner
//!   sessions, live log fan-out).
//! - [`api`]: the tonic services over the engine, the error-to-status mapping, and [`api::serve`].
//! - [`auth`]: API and runner tokens. [`tls`]: TLS files for the listener and the clients.
//! - [`runner`]: `kiln runner`, the runner engine (crate `kiln-runner`) over gRPC.
//! - [`webhook`]: the signed push webhook served next to the gRPC services.
//! - [`cli`]: the `kiln` command line.
//! - [`demo`]: `kiln demo`, the all-in-one showcase.
//! - [`bench`]: `kiln bench`, the benchmarks behind `BENCHMARKS.md`.

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod codec;
pub mod convert;
pub mod demo;
pub mod downloads;
pub mod observer;
pub mod proto;
pub mod report;
pub mod runner;
pub mod tls;
pub mod up;
pub mod webhook;

/// The dispatcher engine (crate `kiln-dispatcher`).
pub use kiln_dispatcher as dispatcher;

/// JUnit XML: reading (crate `kiln-junit`) and a build's merged report (`kiln-dispatcher`).
pub mod junit {
    pub use kiln_dispatcher::junit::*;
    pub use kiln_junit as read;
}
