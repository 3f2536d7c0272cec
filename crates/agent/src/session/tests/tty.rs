//! Terminals: a workload and an exec on a pty (a real one: openpty works unprivileged),
//! their output merged on stdout, input echoed, the size set from the spec and by
//! `Resize`, stdin's end as ^D, and the last output read after the exit.

use std::os::unix::process::CommandExt;

use super::*;

/// Starts `cmd` on a new pty of size `window`: the slave is its stdin, stdout, stderr
/// and controlling terminal (a new session), the agent keeps the master, as the guest's
/// child does with the container's `/dev/ptmx`.
pub(super) fn spawn_on_pty(
    cmd: &mut Command,
    window: Option<WindowSize>,
) -> (std::process::Child, Stdio) {
    let ws = window.map(|w| nix::pty::Winsize {
        ws_row: w.rows,
        ws_col: w.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pty = nix::pty::openpty(ws.as_ref(), None).unwrap();
    let slave = pty.slave;
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and an ioctl on descriptor 0 are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(slave);
    let master = pty.master;
    let stdio = Stdio {
        stdin: master.try_clone().unwrap(),
        pty: Some(master.try_clone().unwrap()),
        stdout: master,
        stderr: None,
    };
    (child, stdio)
}

fn tty_spec(script: &str, window: Option<WindowSize>) -> RunSpec {
    RunSpec {
        terminal: true,
        window,
        ..spec(script)
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_terminal_workload_has_a_tty_of_the_spec_size_merged_output_and_echoed_input() {
    let size = WindowSize { rows: 33, cols: 91 };
    let (out, ended) = session(ChildWorkload::new(), &[], |h| {
        h.start(tty_spec(
            "tty; stty size; echo to-stderr >&2; read x; echo got:$x",
            Some(size),
        ));
        h.send(FromHost::Stdin(b"hello\n".to_vec()));
        h.until_exit()
    });
    ended.result.unwrap();
    let s = text(&out);
    assert!(s.contains("/dev/pts/"), "{s:?}");
    assert!(s.contains("33 91"), "{s:?}");
    assert!(s.contains("to-stderr"), "stderr is merged: {s:?}");
    // The terminal echoes what it is sent, then the shell reads it.
    assert!(s.contains("hello\r\n"), "{s:?}");
    assert!(s.contains("got:hello"), "{s:?}");
    assert!(out.stderr.is_empty(), "a terminal has no stderr: {out:?}");
    assert_eq!(out.status.unwrap().code, Some(0));
}

#[test]
fn without_a_terminal_the_workload_has_none() {
    let (out, ended) = session(ChildWorkload::new(), &[], |h| {
        h.start(spec("tty; true"));
        h.until_exit()
    });
    ended.result.unwrap();
    assert!(text(&out).contains("not a tty"), "{out:?}");
}

#[test]
fn a_resize_changes_the_size_the_process_sees() {
    let (out, ended) = session(ChildWorkload::new(), &[], |h| {
        h.start(tty_spec("stty size; read x; stty size", None));
        // The first size is printed before the resize is sent.
        let mut first = Vec::new();
        while !first.ends_with(b"\r\n") {
            match h.recv() {
                FromGuest::Stdout(d) => first.extend(d),
                m => panic!("unexpected {m:?}"),
            }
        }
        h.send(FromHost::Resize {
            id: None,
            size: WindowSize {
                rows: 50,
                cols: 132,
            },
        });
        h.send(FromHost::Stdin(b"\n".to_vec()));
        (first, h.until_exit())
    });
    ended.result.unwrap();
    let (first, out) = out;
    assert_eq!(first, b"0 0\r\n", "no size was given");
    let s = text(&out);
    assert!(s.ends_with("50 132\r\n"), "{s:?}");
}

#[test]
fn stdin_eof_on_a_terminal_is_its_end_of_file_character() {
    let (out, ended) = session(ChildWorkload::new(), &[], |h| {
        h.start(tty_spec("cat; echo cat-ended", None));
        h.send(FromHost::Stdin(b"abc\n".to_vec()));
        h.send(FromHost::StdinEof);
        h.until_exit()
    });
    ended.result.unwrap();
    let s = text(&out);
    // Echoed, then written back by cat; then cat read end-of-file and the shell went on.
    assert_eq!(s.matches("abc").count(), 2, "{s:?}");
    assert!(s.contains("cat-ended"), "{s:?}");
    assert_eq!(out.status.unwrap().code, Some(0));
}

#[test]
fn the_last_output_of_a_terminal_is_read_after_the_exit() {
    let (out, ended) = session(ChildWorkload::new(), &[], |h| {
        h.start(tty_spec(
            "i=0; while [ $i -lt 3000 ]; do echo line$i; i=$((i+1)); done; exit 3",
            None,
        ));
        h.until_exit()
    });
    ended.result.unwrap();
    let s = text(&out);
    assert!(
        s.contains("line0\r\n") && s.ends_with("line2999\r\n"),
        "{}",
        s.len()
    );
    assert_eq!(out.status.unwrap().code, Some(3));
}

#[test]
fn an_exec_gets_its_own_terminal_and_resize_by_id() {
    let exec = ProcSpec {
        args: vec![
            "/bin/sh".into(),
            "-c".into(),
            "tty; read x; stty size".into(),
        ],
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: "/tmp".into(),
        user: String::new(),
        container: None,
        terminal: true,
        window: Some(WindowSize { rows: 10, cols: 20 }),
    };
    let (out, ended) = session(ChildWorkload::new(), &[], |h| {
        h.start(spec("read x"));
        h.send(FromHost::ProcStart(Box::new(gpucell_protocol::ProcStart {
            id: 5,
            spec: exec,
        })));
        match h.recv() {
            FromGuest::ProcStarted { id: 5, .. } => {}
            m => panic!("expected ProcStarted, got {m:?}"),
        }
        // Another id and the workload (no terminal) ignore a resize.
        for id in [None, Some(6), Some(5)] {
            h.send(FromHost::Resize {
                id,
                size: WindowSize {
                    rows: 40,
                    cols: 100,
                },
            });
        }
        h.send(FromHost::ProcStdin {
            id: 5,
            data: b"\n".to_vec(),
        });
        let mut got = Vec::new();
        loop {
            match h.recv() {
                FromGuest::ProcStdout { id: 5, data } => got.extend(data),
                FromGuest::ProcExited { id: 5, status } => {
                    assert_eq!(status.code, Some(0));
                    break;
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        h.send(FromHost::StdinEof);
        h.until_exit();
        String::from_utf8(got).unwrap()
    });
    ended.result.unwrap();
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("40 100"), "{out:?}");
}
