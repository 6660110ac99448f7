//! Builds the two C helper programs used by the integration tests against the
//! real Berkeley DB 5.3 library:
//!
//! * `tandem-workload` (tests/c/workload.c): commits numbered transactions.
//! * `tandem-check` (tests/c/check.c): proves a recovered copy holds exactly a
//!   committed prefix of those transactions.
//!
//! * `tandem-waitbench` (tests/c/waitbench.c): a multi-threaded workload that
//!   may wait after every commit, for the wait benchmark.
//!
//! The workload and the wait benchmark link the C wait client
//! (`contrib/c/tandem_wait.c`), as an application would. All are linked with
//! `-ldb-5.3` and placed in OUT_DIR; their absolute paths are exported as
//! `TANDEM_WORKLOAD_BIN`, `TANDEM_CHECK_BIN` and `TANDEM_WAITBENCH_BIN` for
//! `env!()`.

use std::path::{Path, PathBuf};
use std::process::Command;

const SETUP_HINT: &str = "Berkeley DB headers not found: run scripts/setup (installs libdb5.3-dev)";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let c_dir = manifest_dir.join("c");

    println!("cargo:rerun-if-changed=build.rs");
    let client_dir = manifest_dir.join("..").join("contrib").join("c");
    for f in ["workload.c", "check.c", "workload_common.h", "waitbench.c"] {
        println!("cargo:rerun-if-changed={}", c_dir.join(f).display());
    }
    for f in ["tandem_wait.c", "tandem_wait.h"] {
        println!("cargo:rerun-if-changed={}", client_dir.join(f).display());
    }

    probe_db_header(&out_dir);

    let workload = out_dir.join("tandem-workload");
    let check = out_dir.join("tandem-check");
    let waitbench = out_dir.join("tandem-waitbench");
    let client = [client_dir.join("tandem_wait.c")];
    compile(&c_dir.join("workload.c"), &workload, &client, &client_dir);
    compile(&c_dir.join("check.c"), &check, &[], &client_dir);
    compile(&c_dir.join("waitbench.c"), &waitbench, &client, &client_dir);

    println!("cargo:rustc-env=TANDEM_WORKLOAD_BIN={}", workload.display());
    println!("cargo:rustc-env=TANDEM_CHECK_BIN={}", check.display());
    println!(
        "cargo:rustc-env=TANDEM_WAITBENCH_BIN={}",
        waitbench.display()
    );
}

fn compiler() -> Command {
    // Only the compiler choice (CC, CFLAGS, target flags) is borrowed from cc;
    // get_compiler() emits no link directives.
    cc::Build::new().get_compiler().to_command()
}

/// Fails the build with a clear message when <db.h> is missing or is not 5.3
/// (the programs link against -ldb-5.3, so the header must match).
fn probe_db_header(out_dir: &Path) {
    let probe = out_dir.join("tandem_db_probe.c");
    std::fs::write(
        &probe,
        "#if defined(__has_include)\n\
         #if !__has_include(<db.h>)\n\
         #error TANDEM_NO_DB_H\n\
         #endif\n\
         #endif\n\
         #include <db.h>\n\
         #if DB_VERSION_MAJOR != 5 || DB_VERSION_MINOR != 3\n\
         #error TANDEM_DB_VERSION_MISMATCH\n\
         #endif\n\
         int tandem_probe;\n",
    )
    .expect("write probe source");
    let output = compiler()
        .arg("-E")
        .arg(&probe)
        .arg("-o")
        .arg(out_dir.join("tandem_db_probe.i"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler: {e}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("TANDEM_DB_VERSION_MISMATCH") && !stderr.contains("TANDEM_NO_DB_H") {
            panic!(
                "<db.h> is not Berkeley DB 5.3 (tests link -ldb-5.3): run scripts/setup \
                 (installs libdb5.3-dev)\n{stderr}"
            );
        }
        panic!("{SETUP_HINT}\n{stderr}");
    }
}

fn compile(src: &Path, exe: &Path, extra: &[PathBuf], include: &Path) {
    let mut cmd = compiler();
    cmd.args(["-O2", "-Wall", "-pthread"])
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(exe)
        .arg(src)
        .args(extra)
        .arg("-ldb-5.3");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler ({cmd:?}): {e}"));
    // Surface compiler warnings in `cargo build -vv` output.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("cargo:warning={line}");
    }
    if !output.status.success() {
        panic!(
            "compiling {} failed ({:?}); is libdb5.3-dev installed? run scripts/setup",
            src.display(),
            cmd
        );
    }
}
