//! The `registry-connector` binary: parse flags, set up logging, run the command.
// Unsafe code is denied everywhere but in `allocator`, the one call into libc.
#![deny(unsafe_code)]

use clap::Parser;
use registry_connector::runtime::{self, cli::Cli};

fn main() -> std::process::ExitCode {
    // Before any thread exists: the limit applies to the arenas threads create.
    allocator::single_arena();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("registry-connector: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        runtime::logging::init(cli.log_format, &cli.log_level);
        match runtime::run(cli.command).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "registry-connector failed");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// glibc's malloc gives each thread that allocates an arena of its own, up to eight per
/// core, and memory freed in one arena is not reused by another. The connector builds
/// its caches on the runtime's workers and on blocking threads (Eureka's decoder), so
/// at 10,000 services × 3 instances a quarter of its heap sat free in arenas it would
/// not return: 76 MiB resident with the default, 66 MiB with one arena (measured, see
/// BENCHMARKS.md). Its allocations are small and few per change, and glibc's per-thread
/// cache serves them without taking the arena's lock, so one arena costs no latency
/// that the benchmark shows. `MALLOC_ARENA_MAX` in the environment (glibc reads it
/// before `main`) still decides when set: this only replaces glibc's default.
mod allocator {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn single_arena() {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var_os("GLIBC_TUNABLES").is_some()
        {
            return;
        }
        // SAFETY: mallopt only sets a parameter of glibc's allocator; called before any
        // other thread is started, so no allocation races with it.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn single_arena() {}
}
