//! Generates the gRPC code from `tandem.proto`. A fresh machine has no
//! `protoc`, so the vendored one from crates.io is used.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: build scripts are single-threaded; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    println!("cargo:rerun-if-changed=tandem.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["tandem.proto"], &["."])?;
    Ok(())
}
