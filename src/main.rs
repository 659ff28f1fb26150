//! The `vignetim-webhooks` binary: everything happens in [`vignetim_webhooks::cli`].

fn main() -> std::process::ExitCode {
    vignetim_webhooks::cli::main()
}
