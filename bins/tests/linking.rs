//! The binaries are linked with packed relative relocations (DT_RELR)
//! where the build machine supports them (see `bins/build.rs`): the
//! loader then reads a few KiB of relocations at start instead of 1.5 MiB.

use std::process::Command;

/// The dynamic section of `exe` as `readelf -d` prints it.
fn dynamic_section(exe: &str) -> String {
    let out = Command::new("readelf")
        .args(["-d", exe])
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf -d {exe} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Size in bytes of the `RELASZ` entry (the classic relocations).
fn rela_size(dynamic: &str) -> u64 {
    dynamic
        .lines()
        .find(|l| l.contains("(RELASZ)"))
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn binaries_pack_their_relative_relocations() {
    if option_env!("VIVIAN_RELR_LINKED") != Some("1") {
        eprintln!(
            "skipped: this machine cannot link or run DT_RELR binaries (see the build warning)"
        );
        return;
    }
    for exe in [env!("CARGO_BIN_EXE_executor"), env!("CARGO_BIN_EXE_salad")] {
        let d = dynamic_section(exe);
        assert!(d.contains("(RELR)"), "{exe} has no DT_RELR:\n{d}");
        let rela = rela_size(&d);
        assert!(
            rela < 256 * 1024,
            "{exe} still has {rela} bytes of RELA relocations"
        );
        // It runs: the loader understands the packed relocations.
        assert!(runs_help(exe), "{exe} --help failed");
    }
}

/// Whether `exe --help` exits successfully within 10 s (killed otherwise).
fn runs_help(exe: &str) -> bool {
    let mut child = Command::new(exe)
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the binary");
    for _ in 0..1000 {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}
