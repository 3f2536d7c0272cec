//! `gpucell run -t`: the workload gets a pty in the guest (real QEMU under TCG, the real
//! guest kernel and agent, a busybox image). Input is echoed and read, stdin's end is
//! ^D, and under a host terminal (`script` gives one) its size reaches the guest and
//! raw mode is restored after the run. Skips as the other VM tests do.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{stderr, stdout, vm_env};

#[test]
fn a_terminal_workload_has_a_pty_echoes_input_and_ends_stdin_with_eof() {
    let Some(env) = vm_env() else { return };
    let mut child = env
        .run_cmd(&[
            "-t",
            &env.image,
            "--",
            "sh",
            "-c",
            "tty; stty size; echo to-stderr >&2; read x; echo got:$x; cat; echo cat-ended",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closing stdin after these lines is the ^D that ends `cat`.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\nabc\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    env.assert_clean();
    let s = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{s:?} stderr: {}", stderr(&out));
    // What was written may be echoed before the shell starts (typed ahead).
    let lines: Vec<&str> = s.split("\r\n").collect();
    let tty = lines
        .iter()
        .position(|l| l.starts_with("/dev/pts/"))
        .unwrap();
    assert!(lines[tty][9..].parse::<u32>().is_ok(), "{s:?}");
    // No host terminal: the CLI's default size.
    assert_eq!(lines[tty + 1], "24 80", "{s:?}");
    assert!(s.contains("to-stderr\r\n"), "stderr is merged: {s:?}");
    assert!(s.contains("got:hello\r\n"), "{s:?}");
    // The terminal echoes `abc`, then cat writes it back.
    assert_eq!(s.matches("abc\r\n").count(), 2, "{s:?}");
    assert!(s.ends_with("cat-ended\r\n"), "{s:?}");
    assert!(!stderr(&out).contains("to-stderr"), "{}", stderr(&out));
}

#[test]
fn without_t_the_workload_has_no_terminal() {
    let Some(env) = vm_env() else { return };
    let out = env.run(&[&env.image, "--", "sh", "-c", "tty; exit 0"]);
    assert_eq!(stdout(&out), "not a tty\n", "stderr: {}", stderr(&out));
}

#[test]
fn under_a_host_terminal_its_size_reaches_the_guest_and_raw_mode_is_undone() {
    let Some(env) = vm_env() else { return };
    if !std::path::Path::new("/usr/bin/script").exists() {
        eprintln!("skipping: script (util-linux) is not installed");
        return;
    }
    // `script` runs the command on a pty of its own: gpucell's stdin and stdout are a
    // terminal, sized here; after the run, the terminal's settings are printed.
    let run = env.run_cmd(&["-t", &env.image, "--", "stty", "size"]);
    let mut line = String::new();
    for (k, v) in run.get_envs() {
        if let Some(v) = v {
            line.push_str(&format!(
                "{}='{}' ",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
    }
    line.push_str(&format!("'{}'", run.get_program().to_string_lossy()));
    for a in run.get_args() {
        line.push_str(&format!(" '{}'", a.to_string_lossy()));
    }
    let script = format!("stty rows 31 cols 97; env {line}; echo rc=$?; stty -a");
    let out = std::process::Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    env.assert_clean();
    let s = stdout(&out);
    assert!(s.contains("31 97"), "{s:?} stderr: {}", stderr(&out));
    assert!(s.contains("rc=0"), "{s:?}");
    // Back in cooked mode: line editing and echo again.
    let after = s.split("rc=0").nth(1).unwrap_or_default();
    assert!(
        after.contains(" icanon") && after.contains(" echo "),
        "{after:?}"
    );
}
