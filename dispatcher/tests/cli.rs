//! The `dispatcher` binary's command line, without a broker: its subcommands exist and a bad flag is
//! refused before anything connects. (Its package owning a test also makes `cargo test --workspace` build
//! the binary that the cross-crate tests in the top-level `tests/` start.)

use std::process::Command;

fn dispatcher(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .env_remove("FLEET_AMQP_URL")
        .output()
        .expect("run the dispatcher binary")
}

#[test]
fn help_lists_the_subcommands() {
    let out = dispatcher(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["serve", "submit", "results"] {
        assert!(help.contains(sub), "`{sub}` missing from --help:\n{help}");
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = dispatcher(&["serve", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
