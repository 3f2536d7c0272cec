//! `gpucell doctor`: gathers what the host crate cannot read under the host root (the
//! KVM boot probe from the sandbox crate, QEMU on this machine), runs the checks, prints
//! them.
//! Exit 0 ready, 1 not ready, 2 doctor itself failed.

use anyhow::Context;
use gpucell_host::doctor::{self, DoctorInput, DoctorReport, KvmProbe, QemuInfo, Status};
use gpucell_host::HostRoot;

use gpucell_sandbox::accel::{self, ProbeInput, ACCEL_ENV};

use super::{write_stdout, Global};

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Skip the KVM boot probe (it boots the guest once under KVM, up to 10 s, and caches
    /// the verdict in the state dir).
    #[arg(long)]
    pub no_kvm_probe: bool,
    /// Guest flavour whose kernel and init image the KVM probe boots.
    #[arg(long, default_value = gpucell_guest::DEFAULT_FLAVOUR)]
    pub guest: String,
}

/// The KVM boot probe result handed to the checks: the sandbox crate's accelerator probe
/// (the same one, and the same cache, `gpucell run` uses), or why it was not run.
fn kvm_probe(global: &Global, args: &DoctorArgs, root: &HostRoot, qemu: &QemuInfo) -> KvmProbe {
    if args.no_kvm_probe {
        return KvmProbe::NotRun("--no-kvm-probe".into());
    }
    if !root.is_live() {
        return KvmProbe::NotRun("--host-root is not this machine".into());
    }
    if let Ok(v) = std::env::var(ACCEL_ENV) {
        if v.trim().eq_ignore_ascii_case("tcg") {
            return KvmProbe::NotRun(format!("{ACCEL_ENV}=tcg"));
        }
    }
    let QemuInfo::Found { path: qemu, .. } = qemu else {
        return KvmProbe::NotRun("QEMU not found".into());
    };
    let guest = match gpucell_guest::load(&global.state_dir, &args.guest) {
        Ok(g) => g,
        Err(e) => return KvmProbe::NotRun(format!("no guest to boot: {e}")),
    };
    let timeout = match global.kvm_probe_timeout() {
        Ok(t) => t,
        Err(e) => return KvmProbe::NotRun(format!("{e:#}")),
    };
    let input = ProbeInput::new(
        qemu,
        &guest.kernel,
        &guest.initrd,
        &global.host_root,
        Some(&global.state_dir),
    )
    .with_timeout(timeout);
    match accel::probe(&input) {
        Ok(p) if p.kvm_usable => KvmProbe::Usable,
        Ok(p) => KvmProbe::Unusable(p.reason),
        Err(e) => KvmProbe::NotRun(format!(
            "the probe could not run: {}",
            gpucell_host::sysfs::error_chain(&e)
        )),
    }
}

pub fn run(global: &Global, args: DoctorArgs) -> anyhow::Result<u8> {
    let root = HostRoot::new(&global.host_root);
    let qemu = doctor::qemu::find(std::env::var_os("PATH").as_deref());
    let input = DoctorInput {
        kvm_probe: Some(kvm_probe(global, &args, &root, &qemu)),
        qemu: Some(qemu),
    };
    let report = doctor::run_with_state_dir(&root, &input, &global.state_dir)
        .context("doctor could not inspect the host")?;
    if global.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        write_stdout(&text)?;
    } else {
        write_stdout(&render_text(&report))?;
    }
    Ok(report.exit_code())
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
