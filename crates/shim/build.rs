//! Generates the kubelet's PodResources API v1 (vendored `proto/podresources.proto`) with
//! tonic: the client the shim asks which devices a pod was given, and the server its
//! tests stand a fake kubelet up with. protox parses the proto (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/podresources.proto");
    let fds = protox::compile(["proto/podresources.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
