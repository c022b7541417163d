//! Links the binaries (executor, salad, ...) with packed relative
//! relocations (`-z pack-relative-relocs`, DT_RELR) where the toolchain and
//! the C library support them.
//!
//! A position-independent Rust binary carries one 24-byte relocation per
//! pointer in its read-only data: 1.5 MiB for the executor, read by the
//! dynamic loader at every start and then resident for the life of the
//! process. Packed, they take a few KiB. The loader must know DT_RELR
//! (glibc 2.36 or later), so the flag is only used when a probe program
//! linked with it runs here, for a native build; `VIVIAN_RELR=0` turns it
//! off (for a binary meant for a machine with an older glibc).

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VIVIAN_RELR");
    println!("cargo:rerun-if-env-changed=CC");
    if std::env::var("VIVIAN_RELR").is_ok_and(|v| v == "0") {
        return;
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    if target != host || !target.ends_with("-linux-gnu") {
        return;
    }
    let flag = "-Wl,-z,pack-relative-relocs";
    if probe(flag) {
        println!("cargo:rustc-link-arg-bins={flag}");
        // For the test that checks the binaries' relocations.
        println!("cargo:rustc-env=VIVIAN_RELR_LINKED=1");
    } else {
        println!(
            "cargo:warning=linking without packed relocations: the linker or the C library does not support {flag} (binaries stay correct, start-up reads 1.5 MiB more)"
        );
    }
}

/// Whether a C program linked with `flag` builds and runs.
fn probe(flag: &str) -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let src = out.join("relr_probe.c");
    let exe = out.join("relr_probe");
    // A pointer in initialised data makes a relative relocation to pack.
    let code = "static const char *s = \"relr\";\nconst char **p = &s;\nint main(void) { return **p == 'r' ? 0 : 1; }\n";
    if std::fs::write(&src, code).is_err() {
        return false;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(cc)
        .args(["-fPIE", "-pie", flag, "-o"])
        .arg(&exe)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    linked
        && Command::new(&exe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}
