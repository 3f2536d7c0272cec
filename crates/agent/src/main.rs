//! gpucell-agent: PID 1 of a gpucell guest.
//!
//! Boot: mount /proc, answer a probe, load modules, leave the initramfs for a tmpfs root,
//! mount /sys and /dev, bring `lo` up, open the channel to the host. Then one run: hello,
//! run spec, devices, the workload in its own namespaces on an overlay of the image,
//! streamed output, exit status, power off. Every failure is reported to the host when the
//! channel is open, logged on the console always, and ends in power-off: PID 1 must never
//! exit or panic (that would be a kernel panic).

mod boot;
mod channel;
mod cmdline;
mod container;
mod container_test;
mod devices;
mod gpu_setup;
mod inject;
mod net;
mod nvidia;
mod rootpath;
mod session;
mod users;
mod workload;

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cmdline::Cmdline;

fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .init();
}

fn main() {
    // The GPU test harness (docs/cuda.md): the container setup outside a VM.
    if let Some(code) = container_test::main_if_asked() {
        std::process::exit(code);
    }
    if nix::unistd::getpid().as_raw() != 1 {
        eprintln!(
            "gpucell-agent {}: this is the init of a gpucell guest and runs only as PID 1 \
             (built into the init image by `gpucell guest build`)",
            env!("CARGO_PKG_VERSION")
        );
        std::process::exit(2);
    }
    init_logging();
    std::panic::set_hook(Box::new(|info| {
        let _ = writeln!(std::io::stderr(), "gpucell-agent: internal error: {info}");
    }));
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("{}", chain(&*e)),
        Err(_) => tracing::error!("the agent panicked; powering off"),
    }
    boot::power_off()
}

/// `a: b: c` from an error and its sources.
pub(crate) use gpucell_common::chain_string as chain;

type AnyError = Box<dyn std::error::Error>;

fn run() -> Result<(), AnyError> {
    boot::mount_pseudo()?;
    let cmdline_text = boot::read_cmdline()?;
    let cmdline = Cmdline::parse(&cmdline_text)?;
    let guest_net = net::GuestNet::from_cmdline(&cmdline_text)?;
    if cmdline.probe {
        println!("{}", cmdline::PROBE_OK);
        let _ = std::io::stdout().flush();
        return Ok(());
    }
    // A module that fails to load is logged; what needs it fails later, with a message.
    // Warnings from before the channel is open, sent to the host as `Log` after hello.
    let mut early = Vec::new();
    let wanted =
        |tag: &str| cmdline.wants_modules(tag) && net::wants_modules(guest_net.as_ref(), tag);
    if let Err(e) = boot::load_modules(&wanted) {
        tracing::error!("{}", chain(&e));
        early.push(chain(&e));
    }
    let _ = nix::mount::umount2("/proc", nix::mount::MntFlags::MNT_DETACH);
    let _ = nix::mount::umount2("/sys", nix::mount::MntFlags::MNT_DETACH);
    let _ = nix::mount::umount2("/dev", nix::mount::MntFlags::MNT_DETACH);
    boot::switch_to_tmpfs()?;
    boot::mount_pseudo()?;
    if let Err(e) = boot::loopback_up() {
        tracing::warn!("{}", chain(&e));
        early.push(chain(&e));
    }
    // The network is up before the channel opens, so before any workload starts.
    if let Some(n) = &guest_net {
        let ifname = net::configure(n)?;
        tracing::info!(%ifname, address = %n.address, "network configured");
    }
    if cmdline.driver_test {
        nvidia::self_test();
        return Ok(());
    }
    let mut workload = workload::Pid1::new()?;
    let channel = channel::open(cmdline.channel)?;
    let mut s = session::Session::new(channel)?;
    s.serve(
        &mut workload,
        session::kernel_release(),
        session::uptime_ms(),
        early,
    )?;
    Ok(())
}
