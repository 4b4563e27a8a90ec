#![no_main]
// mlxserver::fuzz_targets::run("modelfile", ..) under libFuzzer.

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static SCRATCH: LazyLock<PathBuf> = LazyLock::new(mlxserver::fuzz_targets::scratch_dir);

fuzz_target!(|data: &[u8]| {
    mlxserver::fuzz_targets::run("modelfile", data, &SCRATCH);
});
