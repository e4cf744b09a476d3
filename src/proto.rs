//! The generated `kiln.v1` API types, clients and servers.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kiln.v1");

/// The encoded file descriptor set of `proto/kiln/v1`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kiln_descriptor");
