//! `gpucell pull REF`: pull or import an image into the store.

use anyhow::Context;

use super::{open_store, print_json, Global};

#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Image reference: registry (`docker.io/library/busybox:1.36`, `ghcr.io/o/i@sha256:…`),
    /// `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` or `docker-archive:FILE[:NAME:TAG]`.
    pub reference: String,
    /// Also build (or reuse) the guest filesystem image now rather than on first run.
    #[arg(long)]
    pub disk: bool,
}

#[derive(serde::Serialize)]
struct Pulled {
    #[serde(flatten)]
    image: gpucell_image::Image,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<gpucell_image::GuestDisk>,
}

pub fn run(global: &Global, args: PullArgs) -> anyhow::Result<u8> {
    let store = open_store(global, |_| {})?;
    // Errors from the store name the reference, blob or entry already.
    let image = store.pull(&args.reference)?;
    let disk = if args.disk {
        Some(
            store
                .guest_disk(&image)
                .with_context(|| format!("building the guest disk of {}", args.reference))?,
        )
    } else {
        None
    };
    if global.json {
        print_json(&Pulled { image, disk })?;
    } else {
        println!("{} {}", image.digest, image.reference);
        if let Some(d) = disk {
            println!("{} {} {}", d.fstype, d.size, d.path.display());
        }
    }
    Ok(0)
}
