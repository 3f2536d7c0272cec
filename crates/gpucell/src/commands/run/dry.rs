//! `gpucell run --dry-run`: what a run would do, printed; nothing started or held.

use gpucell_runtime::{DryRunReport, Node, RunRequest};

use super::Terminal;
use crate::commands::{print_json, write_stdout, Global};

pub fn run(global: &Global, node: &Node, req: RunRequest) -> anyhow::Result<u8> {
    let mut terminal = Terminal::default();
    let report = match gpucell_runtime::dry_run(node, req, &mut terminal) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", gpucell_runtime::error_chain(&e));
            return Ok(gpucell_runtime::EXIT_RUN_FAILED as u8);
        }
    };
    if global.json {
        print_json(&report)?;
    } else {
        write_stdout(&text(&report))?;
    }
    Ok(0)
}

fn text(r: &DryRunReport) -> String {
    let mut out = String::new();
    let line = |out: &mut String, k: &str, v: &str| out.push_str(&format!("{k:<12}{v}\n"));
    let image = format!(
        "{} {} ({} disk, {} bytes)",
        r.image.reference,
        r.image.digest.as_deref().unwrap_or("-"),
        r.image.fstype.as_deref().unwrap_or("-"),
        r.image.disk_bytes.unwrap_or(0)
    );
    line(&mut out, "image", &image);
    line(&mut out, "guest", &r.guest.flavour);
    if let Some(d) = &r.driver {
        let why = serde_json::to_value(d)
            .ok()
            .and_then(|v| v.get("by").and_then(|b| b.as_str()).map(str::to_string))
            .unwrap_or_default();
        line(
            &mut out,
            "driver",
            &format!(
                "{} (driver {}, CUDA {}; chosen by {why})",
                d.flavour,
                d.driver_version,
                d.max_cuda.as_deref().unwrap_or("?")
            ),
        );
    }
    line(
        &mut out,
        "accel",
        &format!("{} ({})", r.accel.accel, r.accel.how),
    );
    line(
        &mut out,
        "channel",
        &format!("{:?}", r.channel).to_lowercase(),
    );
    line(&mut out, "command", &r.spec.args.join(" "));
    let m = &r.memory;
    let threads = m
        .prealloc_threads
        .map_or("one per vCPU".to_string(), |t| t.to_string());
    line(
        &mut out,
        "memory",
        &match &m.backend {
            Some(b) => format!("{} MiB, preallocated: {b}", r.memory_mib),
            None => format!(
                "{} MiB (preallocated only with a device: {threads} threads, pages {})",
                r.memory_mib, m.hugepage_size
            ),
        },
    );
    if r.devices.is_empty() {
        line(&mut out, "devices", "none");
    }
    for d in &r.devices {
        let bind = if d.needs_bind {
            ", would bind to vfio-pci"
        } else {
            ""
        };
        let companions = if d.companions.is_empty() {
            String::new()
        } else {
            format!(", companions {}", d.companions.join(","))
        };
        line(
            &mut out,
            "device",
            &format!("{} {}{companions}{bind} (not taken)", d.host_bdf, d.id),
        );
    }
    match &r.network {
        None => line(&mut out, "network", "none"),
        Some(n) => network_lines(&mut out, &n.plan, &line),
    }
    for w in &r.warnings {
        line(&mut out, "warning", w);
    }
    let mut argv = vec![r.qemu.display().to_string()];
    argv.extend(r.qemu_args.iter().cloned());
    line(&mut out, "qemu", &shell_words(&argv));
    out
}

/// The private network's addresses, published ports and egress policy.
fn network_lines(
    out: &mut String,
    n: &gpucell_net::NetPlan,
    line: &dyn Fn(&mut String, &str, &str),
) {
    let what = format!(
        "private: {}/{} via {} on tap {} (table inet {}, vhost-net {})",
        n.guest_address,
        n.prefix_len,
        n.gateway,
        n.tap,
        n.table,
        if n.vhost { "on" } else { "off" }
    );
    line(out, "network", &what);
    for p in &n.publish {
        line(out, "publish", &p.to_string());
    }
    let e = &n.egress;
    for r in &e.refused {
        line(out, "refused", &format!("{} ({})", r.cidr, r.why));
    }
    for c in &e.exceptions {
        line(out, "allowed", &format!("{c} (--allow-cidr)"));
    }
    let dns: Vec<String> = e.dns.iter().map(ToString::to_string).collect();
    line(
        out,
        "dns",
        &if dns.is_empty() {
            "none".into()
        } else {
            dns.join(", ")
        },
    );
    if let Some(r) = e.rate_bps {
        line(out, "egress rate", &format!("{r} bit/s"));
    }
    line(out, "ipv6", "refused");
}

/// The command line quoted so that it can be pasted into a shell.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=,.:/@%+".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
