//! Compiles `proto/kiln/v1/*.proto` with `protox` (pure Rust, no `protoc` needed) and hands the
//! descriptor set to `tonic-prost-build`. The encoded descriptor set is also written to `OUT_DIR`
//! so the dispatcher can serve gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/kiln/v1/kiln.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("kiln_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".kiln.v1")
        // Undecodable requests answer INVALID_ARGUMENT (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
