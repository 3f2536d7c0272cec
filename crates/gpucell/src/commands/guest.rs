//! `gpucell guest build|show|list`: guest kernel and init image artifacts.

use std::path::PathBuf;

use anyhow::Context;

use super::{print_json, Global};

#[derive(clap::Subcommand, Debug)]
pub enum GuestCommand {
    /// Build the guest kernel and init image of a flavour (does nothing when up to date).
    Build(BuildArgs),
    /// Show the manifest of a built flavour.
    Show(ShowArgs),
    /// List the known flavours: driver, CUDA, module kind, sizes, built or not, and the
    /// command that builds each.
    #[command(alias = "ls")]
    List,
    /// Boot a driver flavour and check its driver: modules (vermagic; with no GPU they
    /// must stop at the driver's ENODEV), device nodes, nvidia-smi, libcuda's CUDA version.
    Test(TestArgs),
}

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Driver flavour to test, e.g. nvidia-550.
    pub flavour: String,
    /// Pass this host PCI function (bound to vfio-pci) to the test VM.
    #[arg(long, conflicts_with = "gpus")]
    pub device: Vec<String>,
    /// Pass the first N NVIDIA GPUs bound to vfio-pci.
    #[arg(long)]
    pub gpus: Option<usize>,
    /// kvm, tcg or auto (default: $GPUCELL_ACCEL, else auto).
    #[arg(long, env = "GPUCELL_ACCEL", default_value = "auto")]
    pub accel: String,
    #[arg(long, env = "GPUCELL_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: u32,
    /// How long the guest may take to report, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Flavour to build.
    #[arg(long, default_value = gpucell_guest::DEFAULT_FLAVOUR)]
    pub flavour: String,
    /// Static gpucell-agent binary to use as /init (default: $GPUCELL_AGENT, next to
    /// gpucell, or ./target/x86_64-unknown-linux-gnu/release/gpucell-agent).
    #[arg(long, env = "GPUCELL_AGENT")]
    pub agent: Option<PathBuf>,
    /// Use this kernel .deb instead of downloading the flavour's package with apt.
    #[arg(long)]
    pub kernel_deb: Option<PathBuf>,
    /// Guest kernel: `debian` (Debian's packaged kernel) or `microvm` (built once from
    /// Debian's linux-source-6.1 with gpucell's config, then cached in the state dir).
    /// Default: microvm.
    #[arg(long, value_parser = parse_kernel)]
    pub kernel: Option<gpucell_guest::KernelChoice>,
    /// Rebuild even when the cached build matches the inputs.
    #[arg(long)]
    pub force: bool,
}

fn parse_kernel(s: &str) -> Result<gpucell_guest::KernelChoice, String> {
    s.parse()
        .map_err(|e: gpucell_guest::kernel::KernelError| e.to_string())
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    #[arg(long, default_value = gpucell_guest::DEFAULT_FLAVOUR)]
    pub flavour: String,
}

pub fn run(global: &Global, command: GuestCommand) -> anyhow::Result<u8> {
    match command {
        GuestCommand::Build(a) => build(global, a),
        GuestCommand::Show(a) => show(global, a),
        GuestCommand::List => list(global),
        GuestCommand::Test(a) => test(global, a),
    }
}

fn build(global: &Global, a: BuildArgs) -> anyhow::Result<u8> {
    let opts = gpucell_guest::BuildOptions {
        flavour: a.flavour,
        agent: a.agent,
        kernel_deb: a.kernel_deb,
        kernel: a.kernel,
        force: a.force,
        progress: Some(progress_line),
    };
    let art = gpucell_guest::build(&global.state_dir, &opts)?;
    if global.json {
        print_json(&art)?;
    } else {
        let m = &art.manifest;
        println!(
            "guest flavour `{}` {} in {}",
            art.flavour,
            if art.cached { "is up to date" } else { "built" },
            art.dir.display()
        );
        println!(
            "  kernel     {} ({} {})",
            m.kernel_release, m.kernel_package, m.kernel_package_version
        );
        println!(
            "  vmlinux    {} ({} bytes)",
            art.kernel.display(),
            m.vmlinux.size
        );
        println!(
            "  initramfs  {} ({} bytes)",
            art.initrd.display(),
            m.initramfs.size
        );
        println!("  modules    {}", m.modules.join(" "));
    }
    Ok(0)
}

/// Progress of long build steps, on stderr.
fn progress_line(line: &str) {
    eprintln!("  {line}");
}

fn show(global: &Global, a: ShowArgs) -> anyhow::Result<u8> {
    let art = gpucell_guest::load(&global.state_dir, &a.flavour)?;
    if global.json {
        print_json(&art)?;
    } else {
        print!("{}", art.manifest.to_json());
    }
    Ok(0)
}

#[derive(serde::Serialize)]
struct FlavourRow {
    #[serde(flatten)]
    flavour: gpucell_guest::Flavour,
    built: Option<String>,
    /// Driver version, module kind and CUDA version (from the table; the measured CUDA
    /// version once built).
    #[serde(skip_serializing_if = "Option::is_none")]
    nvidia: Option<NvidiaColumns>,
    /// Sizes in bytes of what is built: kernel, init image and, for a driver flavour, the
    /// driver's parts.
    #[serde(skip_serializing_if = "Option::is_none")]
    sizes: Option<Sizes>,
    build_command: String,
}

#[derive(serde::Serialize)]
struct NvidiaColumns {
    driver: String,
    module_kind: String,
    cuda: String,
    devices: usize,
}

#[derive(serde::Serialize)]
struct Sizes {
    vmlinux: u64,
    initramfs: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    driver: Option<gpucell_guest::driver::PartSizes>,
}

fn row(
    global: &Global,
    table: Option<&gpucell_guest::driver::Table>,
    f: &gpucell_guest::Flavour,
) -> FlavourRow {
    let built = gpucell_guest::load(&global.state_dir, f.name).ok();
    let nvidia = f.driver.and_then(|d| {
        let t = table?.find(d).ok()?;
        Some(NvidiaColumns {
            driver: t.version.clone(),
            module_kind: t.module_kind.as_str().to_owned(),
            cuda: built
                .as_ref()
                .and_then(|a| a.manifest.driver.as_ref().map(|d| d.cuda.clone()))
                .unwrap_or_else(|| t.max_cuda.clone()),
            devices: t.device_ids.len(),
        })
    });
    FlavourRow {
        flavour: f.clone(),
        built: built.as_ref().map(|a| a.manifest.kernel_release.clone()),
        nvidia,
        sizes: built.as_ref().map(|a| Sizes {
            vmlinux: a.manifest.vmlinux.size,
            initramfs: a.manifest.initramfs.size,
            driver: a.manifest.driver.as_ref().map(|d| d.sizes.clone()),
        }),
        build_command: format!("gpucell guest build --flavour {}", f.name),
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn list(global: &Global) -> anyhow::Result<u8> {
    let table = gpucell_guest::driver::Table::embedded().context("loading the driver table")?;
    let rows: Vec<FlavourRow> = gpucell_guest::FLAVOURS
        .iter()
        .map(|f| row(global, Some(&table), f))
        .collect();
    if global.json {
        print_json(&rows).context("printing the flavour list")?;
        return Ok(0);
    }
    for r in rows {
        let driver = r.nvidia.as_ref().map_or("no GPU driver".to_owned(), |n| {
            format!("nvidia {} {} CUDA {}", n.driver, n.module_kind, n.cuda)
        });
        let state = match (&r.built, &r.sizes) {
            (Some(k), Some(s)) => {
                let mut t = format!(
                    "built ({k}): vmlinux {}, init {}",
                    mb(s.vmlinux),
                    mb(s.initramfs)
                );
                if let Some(d) = &s.driver {
                    t.push_str(&format!(
                        ", driver disk {} (modules {}, firmware {}, userspace {})",
                        mb(d.disk),
                        mb(d.modules),
                        mb(d.firmware),
                        mb(d.userspace)
                    ));
                }
                t
            }
            _ => format!("not built: {}", r.build_command),
        };
        println!("{:<12} {:<36} {}", r.flavour.name, driver, state);
    }
    Ok(0)
}

/// NVIDIA GPU functions (vendor 0x10de, display class) bound to vfio-pci, sorted.
fn vfio_gpus(sysfs: &std::path::Path) -> Vec<String> {
    let dir = sysfs.join("bus/pci/devices");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| read(e.path().join("vendor")).trim() == "0x10de")
        .filter(|e| read(e.path().join("class")).trim().starts_with("0x03"))
        .filter(|e| {
            std::fs::read_link(e.path().join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n == "vfio-pci"))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn test(global: &Global, a: TestArgs) -> anyhow::Result<u8> {
    use gpucell_sandbox::accel::{self, AccelChoice, ProbeInput};
    let art = gpucell_guest::load(&global.state_dir, &a.flavour)?;
    let sysfs = global.host_root.join("sys");
    let devices = match a.gpus {
        Some(n) => {
            let all = vfio_gpus(&sysfs);
            anyhow::ensure!(
                all.len() >= n,
                "--gpus {n}: only {} NVIDIA GPU(s) are bound to vfio-pci ({})",
                all.len(),
                all.join(", ")
            );
            all.into_iter().take(n).collect()
        }
        None => a.device.clone(),
    };
    let choice: AccelChoice = a.accel.parse()?;
    let probe = ProbeInput::new(
        &a.qemu,
        &art.kernel,
        &art.initrd,
        &global.host_root,
        Some(&global.state_dir),
    );
    let sel = accel::select(choice, &probe)?;
    if let Some(w) = sel.warning() {
        eprintln!("warning: {w}");
    }
    let accel_name = format!("{:?}", sel.accel).to_ascii_lowercase();
    let opts = gpucell_guest::driver::selftest::TestOptions {
        qemu: a.qemu.clone(),
        accel: accel_name,
        memory_mib: a.memory_mib,
        devices,
        timeout: std::time::Duration::from_secs(a.timeout),
        sysfs,
    };
    let out = gpucell_guest::driver::selftest::run(&art, &opts)?;
    if global.json {
        print_json(&out)?;
    } else {
        let r = &out.report;
        println!(
            "guest flavour `{}`: driver {} ({}), kernel {}, booted and checked in {:.1} s",
            out.flavour, r.version, opts.accel, r.kernel, out.boot_seconds
        );
        for m in &r.modules {
            println!(
                "  module {:<14} {:<36} vermagic `{}`",
                m.module, m.result, m.vermagic
            );
        }
        println!(
            "  device nodes  {}",
            if r.device_nodes.is_empty() {
                "none".to_owned()
            } else {
                r.device_nodes.join(" ")
            }
        );
        println!(
            "  libcuda       cuDriverGetVersion = {}",
            r.cuda.output.trim()
        );
        println!(
            "  nvidia-smi    {}",
            r.nvidia_smi
                .output
                .trim()
                .replace('\n', "\n                ")
        );
        for l in &r.kernel_log {
            println!("  kernel        {l}");
        }
        for c in &out.checks {
            println!(
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        println!("{}", if out.passed { "PASS" } else { "FAIL" });
    }
    Ok(if out.passed { 0 } else { 1 })
}
