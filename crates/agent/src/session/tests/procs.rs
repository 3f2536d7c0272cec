//! Processes beside the workload: execs with their own stdio and exit codes, signals,
//! refusals by id, the process limit, and an added container.

use super::*;

fn exec_spec(script: &str) -> ProcSpec {
    ProcSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: "/tmp".into(),
        user: String::new(),
        container: None,
        terminal: false,
        window: None,
    }
}

impl Host {
    fn exec(&mut self, id: u32, spec: ProcSpec) {
        self.send(FromHost::ProcStart(Box::new(gpucell_protocol::ProcStart {
            id,
            spec,
        })));
    }

    /// `ProcStarted` of `id`: its pid.
    fn proc_started(&mut self, id: u32) -> i32 {
        match self.recv() {
            FromGuest::ProcStarted { id: got, pid } if got == id => pid,
            m => panic!("expected ProcStarted of {id}, got {m:?}"),
        }
    }

    /// `ProcError` of `id`: its message.
    fn proc_error(&mut self, id: u32) -> String {
        match self.recv() {
            FromGuest::ProcError { id: got, message } if got == id => message,
            m => panic!("expected ProcError of {id}, got {m:?}"),
        }
    }

    /// The output of process `id` until its `ProcExited`; nothing else may come.
    fn proc_until_exit(&mut self, id: u32) -> Output {
        let mut out = Output::default();
        loop {
            match self.recv() {
                FromGuest::ProcStdout { id: i, data } if i == id => out.stdout.extend(data),
                FromGuest::ProcStderr { id: i, data } if i == id => out.stderr.extend(data),
                FromGuest::ProcExited { id: i, status } if i == id => {
                    out.status = Some(status);
                    return out;
                }
                m => panic!("unexpected {m:?} while process {id} runs; so far {out:?}"),
            }
        }
    }
}

#[test]
fn an_exec_runs_beside_the_workload_with_its_own_output_and_exit_code() {
    let (got, ended) = session(ChildWorkload::new(), &[], |host| {
        let main = host.start(spec("exec cat"));
        host.exec(1, exec_spec("pwd; echo err >&2; exit 5"));
        let pid = host.proc_started(1);
        let exec = host.proc_until_exit(1);
        // The workload still runs: its stdin still reaches it.
        host.send(FromHost::Stdin(b"still here\n".to_vec()));
        host.send(FromHost::StdinEof);
        let out = host.until_exit();
        (main, pid, exec, out)
    });
    ended.result.unwrap();
    let (main, pid, exec, out) = got;
    assert_ne!(main, pid);
    assert_eq!(exec.stdout, b"/tmp\n");
    assert_eq!(exec.stderr, b"err\n");
    assert_eq!(exec.status.unwrap().code, Some(5));
    assert_eq!(out.stdout, b"still here\n");
    assert_eq!(out.status.unwrap().code, Some(0));
    assert_eq!(ended.workload.exec_targets, vec![Pid::from_raw(main)]);
}

#[test]
fn several_execs_take_their_own_stdin_and_a_killed_one_reports_the_signal() {
    let (got, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec cat"));
        host.exec(1, exec_spec("exec sleep 30"));
        host.proc_started(1);
        host.exec(2, exec_spec("exec cat"));
        host.proc_started(2);
        host.send(FromHost::ProcStdin {
            id: 2,
            data: b"to two".to_vec(),
        });
        // Stdin and signals for an id nobody runs are dropped.
        host.send(FromHost::ProcStdin {
            id: 77,
            data: b"lost".to_vec(),
        });
        host.send(FromHost::ProcSignal { id: 77, signal: 9 });
        host.send(FromHost::ProcStdinEof { id: 2 });
        let two = host.proc_until_exit(2);
        host.send(FromHost::ProcSignal {
            id: 1,
            signal: libc::SIGKILL,
        });
        let one = host.proc_until_exit(1);
        host.send(FromHost::StdinEof);
        (one, two, host.until_exit())
    });
    ended.result.unwrap();
    let (one, two, out) = got;
    assert_eq!(two.stdout, b"to two");
    assert_eq!(two.status.unwrap().code, Some(0));
    assert_eq!(one.status.unwrap().signal, Some(libc::SIGKILL));
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(out.status.unwrap().code, Some(0));
}

#[test]
fn execs_still_running_when_the_workload_exits_are_killed_and_reported_first() {
    let (got, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec cat"));
        host.exec(9, exec_spec("exec sleep 30"));
        host.proc_started(9);
        host.send(FromHost::StdinEof);
        let exec = host.proc_until_exit(9);
        (exec, host.until_exit())
    });
    ended.result.unwrap();
    let (exec, out) = got;
    assert_eq!(exec.status.unwrap().signal, Some(libc::SIGKILL));
    assert_eq!(out.status.unwrap().code, Some(0));
}

#[test]
fn bad_execs_are_refused_by_id_and_the_run_goes_on() {
    let (got, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec cat"));
        let mut missing = exec_spec("");
        missing.args = vec!["/nonexistent/tool".into()];
        host.exec(1, missing);
        let missing = host.proc_error(1);
        host.exec(2, exec_spec("exec sleep 30"));
        host.proc_started(2);
        host.exec(2, exec_spec("true"));
        let in_use = host.proc_error(2);
        let mut elsewhere = exec_spec("true");
        elsewhere.container = Some(5);
        host.exec(3, elsewhere);
        let no_container = host.proc_error(3);
        host.send(FromHost::StdinEof);
        assert_eq!(
            host.proc_until_exit(2).status.unwrap().signal,
            Some(libc::SIGKILL)
        );
        let out = host.until_exit();
        (missing, in_use, no_container, out)
    });
    ended.result.unwrap();
    let (missing, in_use, no_container, out) = got;
    assert!(
        missing.starts_with("starting the workload failed: /nonexistent/tool: "),
        "{missing}"
    );
    assert_eq!(in_use, "process id 2 is already in use");
    assert_eq!(no_container, "no running container has id 5");
    assert_eq!(out.status.unwrap().code, Some(0));
}

#[test]
fn more_than_max_procs_at_once_are_refused() {
    let max = gpucell_protocol::MAX_PROCS as u32;
    let (message, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec cat"));
        for id in 0..max {
            host.exec(id, exec_spec("exec sleep 30"));
            host.proc_started(id);
        }
        host.exec(max, exec_spec("true"));
        let message = host.proc_error(max);
        host.send(FromHost::Shutdown);
        host.closed();
        message
    });
    ended.result.unwrap();
    assert_eq!(
        message,
        "64 processes already run besides the workload, the most the agent allows"
    );
}

#[test]
fn an_added_container_runs_by_id_and_takes_execs() {
    let (got, ended) = session(ChildWorkload::new(), &[], |host| {
        host.start(spec("exec cat"));
        let mut second = spec("echo from the second; exec sleep 30");
        second.rootfs.device = "/dev/vdb".into();
        host.send(FromHost::ContainerAdd(Box::new(
            gpucell_protocol::ContainerAdd {
                id: 4,
                spec: second,
            },
        )));
        let pid = host.proc_started(4);
        match host.recv() {
            FromGuest::ProcStdout { id: 4, data } => assert_eq!(data, b"from the second\n"),
            m => panic!("unexpected {m:?}"),
        }
        let mut inside = exec_spec("echo inside");
        inside.container = Some(4);
        host.exec(5, inside);
        host.proc_started(5);
        let exec = host.proc_until_exit(5);
        host.send(FromHost::ProcSignal { id: 4, signal: 15 });
        let second = host.proc_until_exit(4);
        host.send(FromHost::StdinEof);
        host.until_exit();
        (pid, exec, second)
    });
    ended.result.unwrap();
    let (pid, exec, second) = got;
    assert_eq!(exec.stdout, b"inside\n");
    assert_eq!(second.status.unwrap().signal, Some(15));
    assert_eq!(ended.workload.added, vec![4]);
    assert_eq!(
        ended.workload.removed,
        vec![4],
        "the ended container's mounts came off"
    );
    assert_eq!(ended.workload.exec_targets, vec![Pid::from_raw(pid)]);
}
