//! Kiln's end-to-end tests, one integration binary: real `kiln` processes (the binary cargo
//! built) on loopback ports, real git repositories in temp dirs, the real SQLite file, a real
//! PostgreSQL (`kiln-pgtest`), real grpcurl and pytest. The helpers are the `kiln-testkit` crate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bad_input;
mod browser;
mod cluster;
mod dispatcher_edges;
mod dispatcher_urls;
mod e2e;
mod failover;
mod faults;
mod grpcurl;
mod hook;
mod lifecycle;
mod metrics;
mod mirror_cache;
mod notify;
mod observer;
mod otel;
mod params;
mod partition;
mod pipelines;
mod pool;
mod postgres;
mod restart;
mod run_limit;
mod runner_death;
mod runner_security;
mod runner_stop;
mod security;
mod security_e2e;
mod sessions;
mod split;
mod web;
mod webhook;
