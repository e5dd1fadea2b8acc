//! The `yiqiao` binary. See `yiqiao --help` and `cli.rs` for commands and exit codes.

fn main() -> std::process::ExitCode {
    cap_malloc_arenas();
    yiqiao_gateway::cli::main()
}

/// glibc's allocator gives threads that contend for it arenas of their own, up to eight per
/// core, and keeps what each arena once held: under steady load the gateway's resident memory
/// crept up for as long as the soak ran (82 → 115 MB in ten minutes) while its live heap stayed
/// under 20 MB (heaptrack). With the arenas capped at the core count it stays flat
/// (BENCHMARKS.md, "Soak"). `MALLOC_ARENA_MAX` is read by glibc when the process starts, so
/// the binary starts itself again once, with the cap set, before any thread exists; an
/// operator's own `MALLOC_ARENA_MAX` (or glibc tunables) is left alone, and if the exec
/// fails the process goes on with glibc's default.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env("MALLOC_ARENA_MAX", cores.to_string())
        .exec();
    eprintln!(
        "yiqiao: could not restart with MALLOC_ARENA_MAX={cores} ({err}); going on with glibc's default arenas"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}
