//! `gpucell doctor`: gathers what the host crate cannot read under the host root (the
//! KVM boot probe, QEMU on this machine), runs the checks, prints them.
//! Exit 0 ready, 1 not ready, 2 doctor itself failed.

use anyhow::Context;
use gpucell_host::doctor::{self, DoctorInput, DoctorReport, KvmProbe, Status};
use gpucell_host::HostRoot;

use super::Global;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {}

/// The KVM boot probe result handed to the checks.
///
/// Integration point: once the sandbox crate exposes its accelerator probe, replace the
/// body with a call such as `gpucell_sandbox::accel::probe(...)` mapped onto
/// [`KvmProbe::Usable`] / [`KvmProbe::Unusable`] (and `NotRun` when the probe is skipped,
/// e.g. `GPUCELL_ACCEL=tcg` or a host root that is not this machine).
fn kvm_probe(root: &HostRoot) -> KvmProbe {
    if !root.is_live() {
        return KvmProbe::NotRun("--host-root is not this machine".into());
    }
    KvmProbe::NotRun("the boot probe is not wired into doctor yet".into())
}

pub fn run(global: &Global, _args: DoctorArgs) -> anyhow::Result<u8> {
    let root = HostRoot::new(&global.host_root);
    let input = DoctorInput {
        kvm_probe: Some(kvm_probe(&root)),
        qemu: Some(doctor::qemu::find(std::env::var_os("PATH").as_deref())),
    };
    let report = doctor::run(&root, &input).context("doctor could not inspect the host")?;
    if global.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        write_stdout(&text)?;
    } else {
        write_stdout(&render_text(&report))?;
    }
    Ok(report.exit_code())
}

/// Writes to stdout; a closed pipe (`gpucell doctor | head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn mark(s: Status) -> &'static str {
    match s {
        Status::Pass => "✓",
        Status::Warn => "!",
        Status::Fail => "✗",
    }
}

/// One line per check (`✓ title  detail`), a `fix:` line under each that did not pass, and
/// a summary line.
pub fn render_text(r: &DoctorReport) -> String {
    let width = r
        .checks
        .iter()
        .map(|c| c.title.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for c in &r.checks {
        out.push_str(&format!(
            "{} {:<width$}  {}\n",
            mark(c.status),
            c.title,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("  {:<width$}  fix: {fix}\n", ""));
        }
    }
    let s = &r.summary;
    out.push_str(&format!(
        "\n{}: {} passed, {} warnings, {} failed\n",
        if r.ready { "ready" } else { "not ready" },
        s.pass,
        s.warn,
        s.fail
    ));
    out
}
