//! Compiles the integration tests' gRPC service (tests/proto) with protox,
//! so that a real tonic client and server can be put behind the tunnel.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["tests/proto/echo.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["tests/proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
