//! Compiles every `src/bpf/*.c` with clang (`-O2 -g -target bpf`, so the objects carry BTF)
//! into `OUT_DIR`, where `src/lib.rs` embeds them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let include = manifest_dir.join("include");
    println!("cargo:rerun-if-changed={}", include.display());
    let clang = std::env::var("SKIFF_CLANG").unwrap_or_else(|_| "clang".to_owned());
    let multiarch = multiarch_include();
    let sources = manifest_dir.join("src/bpf");
    println!("cargo:rerun-if-changed={}", sources.display());
    let entries = std::fs::read_dir(&sources).expect("read src/bpf");
    for entry in entries {
        let source = entry.expect("read src/bpf").path();
        if source.extension().is_none_or(|extension| extension != "c") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", source.display());
        let object = out_dir.join(source.with_extension("o").file_name().expect("a file name"));
        compile(&clang, &source, &include, multiarch.as_deref(), &object);
    }
}

fn compile(clang: &str, source: &Path, include: &Path, multiarch: Option<&Path>, output: &Path) {
    let mut command = Command::new(clang);
    command
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-I"])
        .arg(include);
    if let Some(multiarch) = multiarch {
        command.arg("-I").arg(multiarch);
    }
    command.arg("-c").arg(source).arg("-o").arg(output);
    let status = match command.status() {
        Ok(status) => status,
        Err(error) => panic!(
            "run {clang} to build the eBPF programs: {error} (install clang and libbpf-dev; `cargo xtask test` and `cargo xtask up` install them)"
        ),
    };
    assert!(
        status.success(),
        "{clang} failed on {}: {status}",
        source.display()
    );
}

/// The directory with `asm/types.h` for the build machine's architecture, which
/// `linux/types.h` needs and `-target bpf` does not search by itself.
fn multiarch_include() -> Option<PathBuf> {
    let output = Command::new("gcc").arg("-print-multiarch").output().ok()?;
    let triple = String::from_utf8(output.stdout).ok()?;
    let dir = Path::new("/usr/include").join(triple.trim());
    dir.is_dir().then_some(dir)
}
