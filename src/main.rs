//! The `vignetim-webhooks` binary: everything happens in [`vignetim_webhooks::cli`].

/// See BENCHMARKS.md (step 15): glibc's `malloc` was about a tenth of the service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    vignetim_webhooks::cli::main()
}
