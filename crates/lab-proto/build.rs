//! Compiles every `.proto` under the workspace's `proto/` folder.
//!
//! protox is a protobuf compiler written in Rust, so a fresh machine builds
//! the lab without a system `protoc`. The descriptor set it produces is fed to
//! tonic-prost-build for code generation and also written to OUT_DIR, where
//! gRPC server reflection picks it up (that is what lets `grpcurl describe`
//! work without the .proto files).

use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let mut files = Vec::new();
    collect_protos(&root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("lab_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            out.push(path);
        }
    }
    Ok(())
}
