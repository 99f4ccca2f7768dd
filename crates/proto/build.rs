// Generates the gRPC code from proto/ with a protoc shipped as a crate, so a
// build needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "trellis/v1/keyvault.proto",
        "trellis/v1/device.proto",
        "trellis/v1/firmware.proto",
        "trellis/v1/signer.proto",
        "trellis/v1/ota.proto",
        "trellis/v1/access.proto",
    ];
    let paths: Vec<_> = files.iter().map(|f| root.join(f)).collect();
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    // The descriptors let tests enumerate every method of every service
    // (each must have an access rule).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("trellis_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&paths, &[root])?;
    Ok(())
}
