//! Build script: validate every WGSL kernel with naga (a broken shader fails `cargo build`), and
//! generate the gRPC code from `proto/` with the protoc that `protoc-bin-vendored` ships.

use std::path::Path;

fn main() {
    validate_shaders(Path::new("shaders"));
    // The Alard–Lupton kernels have their own bindings: validated without the shared prefix.
    println!("cargo:rerun-if-changed=shaders/al");
    validate_dir(Path::new("shaders/al"), "");
    // So have the whole-frame kernels (`gpu::kernels::frame`), with their own shared prefix
    // (`shaders/frame/shared/`).
    validate_shaders(Path::new("shaders/frame"));
    validate_shaders(Path::new("shaders/stack"));
    // The resident stacks (`gpu::kernels::ring`) declare everything themselves.
    validate_shaders(Path::new("shaders/ring"));
    compile_protos();
}

fn validate_shaders(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    // Declarations shared by every kernel are prepended, as src/gpu/kernels/mod.rs does.
    let mut shared = String::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("shared")) {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            println!("cargo:rerun-if-changed={}", p.display());
            shared.push_str(&std::fs::read_to_string(&p).expect("read shared shader"));
            shared.push('\n');
        }
    }
    validate_dir(dir, &shared);
}

/// Validate every `*.wgsl` directly in `dir`, each with `shared` prepended.
fn validate_dir(dir: &Path, shared: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let src = shared.to_string() + &std::fs::read_to_string(&path).expect("read shader");
        let module = match naga::front::wgsl::parse_str(&src) {
            Ok(m) => m,
            Err(e) => panic!("{}: {}", path.display(), e.emit_to_string(&src)),
        };
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        if let Err(e) = validator.validate(&module) {
            panic!("{}: {}", path.display(), e.emit_to_string(&src));
        }
    }
}

fn compile_protos() {
    println!("cargo:rerun-if-changed=proto/blink/v1/blink.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY: build scripts are single-threaded; tonic-prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(&["proto/blink/v1/blink.proto"], &["proto"])
        .expect("compile proto/blink/v1/blink.proto");
}
