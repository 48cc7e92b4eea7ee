//! Generates the gRPC code of `proto/flash.proto` with protox (a protobuf
//! compiler in Rust: no system `protoc` needed) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/flash.proto");
    let fds = protox::compile(["flash.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
