//! `gpucell image ls|inspect|rm|prune|disk`.

use anyhow::Context;
use gpucell_image::{FsType, Store};

use super::{open_store, print_json, Global};

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// List stored images with their names, sizes and guest disks.
    #[command(alias = "list")]
    Ls,
    /// Show an image's digest, layers and run configuration.
    Inspect {
        /// A stored name, digest, or unique digest prefix (12+ hex digits).
        reference: String,
    },
    /// Remove names; an image with no name left is deleted with its disk and blobs.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Delete unnamed images, unused blobs and disks, and leftovers of crashed runs.
    Prune,
    /// Build (or reuse) the guest filesystem image of an image and print its path.
    Disk {
        reference: String,
        /// Filesystem of the disk (default: GPUCELL_IMAGE_FS or erofs).
        #[arg(long, value_parser = ["erofs", "ext4"])]
        fs: Option<String>,
    },
}

fn open(global: &Global) -> anyhow::Result<Store> {
    open_store(global, |_| {})
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

#[derive(serde::Serialize)]
struct Inspected {
    #[serde(flatten)]
    image: gpucell_image::Image,
    names: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<gpucell_image::GuestDisk>,
}

pub fn run(global: &Global, command: ImageCommand) -> anyhow::Result<u8> {
    match command {
        ImageCommand::Ls => ls(global),
        ImageCommand::Inspect { reference } => inspect(global, &reference),
        ImageCommand::Rm { references } => rm(global, &references),
        ImageCommand::Prune => prune(global),
        ImageCommand::Disk { reference, fs } => disk(global, &reference, fs.as_deref()),
    }
}

fn ls(global: &Global) -> anyhow::Result<u8> {
    let store = open(global)?;
    let images = store.list()?;
    if global.json {
        print_json(&images)?;
        return Ok(0);
    }
    println!("{:<12}  {:>10}  {:<6}  NAMES", "DIGEST", "SIZE", "DISK");
    for i in images {
        let disk = i.disk.as_ref().map_or("-", |d| d.fstype.as_str());
        let names = if i.names.is_empty() {
            "<none>".to_owned()
        } else {
            i.names.join(", ")
        };
        println!(
            "{:<12}  {:>10}  {:<6}  {names}",
            short(&i.digest),
            human(i.size),
            disk
        );
    }
    Ok(0)
}

fn inspect(global: &Global, reference: &str) -> anyhow::Result<u8> {
    let store = open(global)?;
    let image = store.inspect(reference)?;
    let names = store.names_of(&image.digest)?;
    let digest = gpucell_image::digest::Digest::parse(&image.digest)?;
    let disk = store.cached_disk(&digest);
    let inspected = Inspected { image, names, disk };
    if global.json {
        print_json(&inspected)?;
    } else {
        print_inspected(&inspected);
    }
    Ok(0)
}

fn print_inspected(Inspected { image, names, disk }: &Inspected) {
    let c = &image.config;
    println!("Digest:      {}", image.digest);
    println!("Names:       {}", names.join(", "));
    println!("Platform:    {}/{}", c.os, c.architecture);
    if let Some(created) = &image.created {
        println!("Created:     {created}");
    }
    println!(
        "Size:        {} ({} layers)",
        human(image.size),
        image.layers.len()
    );
    println!("Entrypoint:  {:?}", c.entrypoint);
    println!("Cmd:         {:?}", c.cmd);
    println!("WorkingDir:  {}", c.working_dir);
    println!("User:        {}", c.user);
    println!("Env:");
    for e in &c.env {
        println!("  {e}");
    }
    println!("Labels:");
    for (k, v) in &c.labels {
        println!("  {k}={v}");
    }
    println!("Layers:");
    for l in &image.layers {
        println!("  {} {:>10} {}", l.digest, human(l.size), l.media_type);
    }
    if let Some(d) = disk {
        println!(
            "Disk:        {} {} ({})",
            d.fstype,
            d.path.display(),
            human(d.size)
        );
    }
}

fn rm(global: &Global, references: &[String]) -> anyhow::Result<u8> {
    let store = open(global)?;
    let mut reports = Vec::new();
    for r in references {
        let report = store.remove(r).with_context(|| format!("removing {r}"))?;
        if !global.json {
            for n in &report.untagged {
                println!("untagged: {n}");
            }
            for d in &report.deleted {
                println!("deleted: {d}");
            }
        }
        reports.push(report);
    }
    if global.json {
        print_json(&reports)?;
    }
    Ok(0)
}

fn prune(global: &Global) -> anyhow::Result<u8> {
    let store = open(global)?;
    let report = store.prune()?;
    if global.json {
        print_json(&report)?;
    } else {
        for i in &report.images {
            println!("deleted: {i}");
        }
        println!(
            "removed {} images, {} blobs, {} disks, {} temporary entries; freed {}",
            report.images.len(),
            report.blobs,
            report.disks,
            report.temp_entries,
            human(report.freed_bytes)
        );
    }
    Ok(0)
}

fn disk(global: &Global, reference: &str, fs: Option<&str>) -> anyhow::Result<u8> {
    let store = open_store(global, |options| {
        if let Some(fs) = fs.and_then(FsType::parse) {
            options.fs_type = fs;
        }
    })?;
    let image = store.get_or_fetch(reference)?;
    let disk = store
        .guest_disk(&image)
        .with_context(|| format!("building the guest disk of {reference}"))?;
    if global.json {
        print_json(&disk)?;
    } else {
        println!("{}", disk.path.display());
    }
    Ok(0)
}
