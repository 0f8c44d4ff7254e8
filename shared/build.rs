//! Compiles proto/*.proto with protox (pure Rust), so building needs no
//! system protoc, and keeps the descriptor set for gRPC server reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../proto/tunnel.proto", "../proto/introspection.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("tunnel_descriptor.bin"), fds.encode_to_vec())?;
    // Our codec: tonic's default buffers cost 16 KiB per idle call (src/codec.rs).
    tonic_prost_build::configure().bytes(".").codec_path("crate::codec::TunnelCodec").compile_fds(fds)?;
    // etcd's API, client side only; and what servers store in it.
    let stored = ["../proto/etcd.proto", "../proto/cluster.proto"];
    for p in stored {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(stored, ["../proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
