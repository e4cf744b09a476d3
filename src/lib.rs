//! Kiln: a distributed build farm and CI system.
//!
//! This crate is the program: the gRPC edge and everything that talks over the network. The
//! engine it drives lives in the `kiln-*` crates, which know nothing of gRPC: the dispatcher
//! (`kiln-dispatcher`) and the runner (`kiln-runner`) speak the domain's messages
//! (`kiln_domain::protocol`), and this crate carries them over tonic.
//!
//! - [`proto`]: the generated `kiln.v1` types and the descriptor set for reflection;
//!   [`codec`]: prost's codec that answers INVALID_ARGUMENT to a message that does not decode.
//! - [`convert`]: the one place wire types become domain types and back.
//! - [`api`]: the tonic services over the dispatcher engine, the error-to-status mapping, and
//!   [`api::serve`]; [`webhook`] and [`downloads`]: the plain HTTP routes beside them.
//! - [`auth`]: API and runner tokens. [`tls`]: TLS files for the listener and the clients.
//! - [`runner`]: the runner engine over gRPC (its tonic transport, TLS, token start-up).
//! - [`client`]: how a client reaches a dispatcher, and the clients connected from it.
//! - [`observer`]: `kiln watch`, reporting new commits of watched repositories.
//! - [`cli`]: the `kiln` command line, one file per command; [`report`]: how it prints a
//!   test report.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod codec;
pub mod convert;
pub mod downloads;
pub mod observer;
pub mod proto;
pub mod report;
pub mod runner;
pub mod telemetry;
pub mod tls;
pub mod webhook;
