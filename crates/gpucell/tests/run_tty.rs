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
            "-u",
            "1000:1000",
            &env.image,
            "--",
            "sh",
            "-c",
            "tty; stty size; stat -c owner:%u $(tty); echo to-stderr >&2; read x; \
             echo got:$x; cat; echo cat-ended",
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
    // The user's terminal is the user's.
    assert!(s.contains("owner:1000\r\n"), "{s:?}");
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

/// `cmd` as one line of `sh`, its environment included.
fn shell_line(cmd: &std::process::Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut line = String::from("env");
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            line.push_str(&format!(" {}={}", k.to_string_lossy(), quote(v)));
        }
    }
    line.push(' ');
    line.push_str(&quote(cmd.get_program()));
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(a));
    }
    line
}

fn under_script(line: &str) -> std::process::Output {
    std::process::Command::new("script")
        .args(["-qec", line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_host_terminal_resized_during_the_run_resizes_the_workloads() {
    let Some(env) = vm_env() else { return };
    if !std::path::Path::new("/usr/bin/script").exists() {
        eprintln!("skipping: script (util-linux) is not installed");
        return;
    }
    // The workload waits until its size is no longer the first; the host's terminal
    // changes size (SIGWINCH to gpucell) every half second until the run ends.
    let wait = "stty size; i=0; until [ \"$(stty size)\" != '31 97' ] || [ $i -ge 300 ]; \
                do sleep 0.1; i=$((i+1)); done; stty size";
    let run = env.run_cmd(&["-t", &env.image, "--", "sh", "-c", wait]);
    let line = format!(
        "stty rows 31 cols 97; {} & pid=$!; n=0; while kill -0 $pid 2>/dev/null; do \
         sleep 0.5; stty rows $((40 + n % 2)) cols 120; n=$((n + 1)); done; wait $pid; \
         echo rc=$?",
        shell_line(&run)
    );
    let out = under_script(&line);
    env.assert_clean();
    let s = stdout(&out);
    assert!(s.contains("rc=0"), "{s:?} {}", stderr(&out));
    let sizes: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| l.ends_with(" 97") || l.ends_with(" 120"))
        .collect();
    assert!(sizes.len() >= 2, "{s:?}");
    assert!(
        ["40 120", "41 120"].contains(sizes.last().unwrap()),
        "{sizes:?}"
    );
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
    let script = format!(
        "stty rows 31 cols 97; {}; echo rc=$?; stty -a",
        shell_line(&run)
    );
    let out = under_script(&script);
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
