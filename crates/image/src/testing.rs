//! Test support (feature `test-support`): writes OCI image layouts from in-memory
//! entries or a directory. Tar headers are written byte by byte, so tests can also
//! build the hostile archives no safe tar writer would produce (`..`, absolute names,
//! links out of the tree, devices, truncation).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde_json::json;

use crate::digest::Digest;
use crate::manifest::{Compression, OCI_INDEX, OCI_MANIFEST};

#[derive(Debug, Clone)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    Fifo,
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
}

/// One tar entry; paths and link targets are raw bytes, never checked.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Builds one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerBuilder {
    pub entries: Vec<Entry>,
    pub compression: Option<Compression>,
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder::default()
    }

    pub fn entry(mut self, path: impl AsRef<[u8]>, kind: Kind, mode: u32) -> Self {
        self.entries.push(Entry {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            xattrs: Vec::new(),
        });
        self
    }

    pub fn file(self, path: impl AsRef<[u8]>, data: impl AsRef<[u8]>, mode: u32) -> Self {
        self.entry(path, Kind::File(data.as_ref().to_vec()), mode)
    }
    pub fn dir(self, path: impl AsRef<[u8]>, mode: u32) -> Self {
        self.entry(path, Kind::Dir, mode)
    }
    pub fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        self.entry(path, Kind::Symlink(target.as_ref().to_vec()), 0o777)
    }
    pub fn hardlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        self.entry(path, Kind::HardLink(target.as_ref().to_vec()), 0o644)
    }
    /// `.wh.NAME` in NAME's directory: deletes NAME from lower layers.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(wh, b"", 0o644)
    }
    /// `DIR/.wh..wh..opq`: hides everything lower layers had in DIR.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(
            format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            b"",
            0o644,
        )
    }
    /// Sets the owner of the last entry added.
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        if let Some(e) = self.entries.last_mut() {
            e.uid = uid;
            e.gid = gid;
        }
        self
    }
    /// Adds an xattr to the last entry added.
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        if let Some(e) = self.entries.last_mut() {
            e.xattrs.push((name.into(), value.as_ref().to_vec()));
        }
        self
    }
    pub fn compression(mut self, c: Compression) -> Self {
        self.compression = Some(c);
        self
    }

    /// Adds every entry of a directory tree (not following symlinks), with its modes and
    /// owners, under `prefix` (may be empty).
    pub fn from_dir(mut self, dir: &Path, prefix: &str) -> io::Result<Self> {
        let mut stack = vec![(dir.to_owned(), prefix.trim_end_matches('/').to_owned())];
        while let Some((d, p)) = stack.pop() {
            let mut entries: Vec<_> = fs::read_dir(&d)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let md = e.path().symlink_metadata()?;
                let name = e.file_name().to_string_lossy().into_owned();
                let path = if p.is_empty() {
                    name
                } else {
                    format!("{p}/{name}")
                };
                let ft = md.file_type();
                let kind = if ft.is_dir() {
                    stack.push((e.path(), path.clone()));
                    Kind::Dir
                } else if ft.is_symlink() {
                    Kind::Symlink(
                        fs::read_link(e.path())?
                            .as_os_str()
                            .as_encoded_bytes()
                            .to_vec(),
                    )
                } else if ft.is_file() {
                    Kind::File(fs::read(e.path())?)
                } else if ft.is_fifo() {
                    Kind::Fifo
                } else {
                    continue;
                };
                self = self
                    .entry(path, kind, md.mode() & 0o7777)
                    .owner(md.uid(), md.gid());
            }
        }
        Ok(self)
    }

    /// The uncompressed tar.
    pub fn tar(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for e in &self.entries {
            write_entry(&mut out, e);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    field[..w].copy_from_slice(&s.as_bytes()[s.len() - w..]);
    field[w] = 0;
}

/// A raw 512-byte ustar header (checksum filled in). Name and link are truncated to
/// 100 bytes; longer ones need a PAX header first.
pub fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8], e: Option<&Entry>) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(e.map_or(0o644, |e| e.mode)));
    octal(&mut h[108..116], u64::from(e.map_or(0, |e| e.uid)));
    octal(&mut h[116..124], u64::from(e.map_or(0, |e| e.gid)));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], e.map_or(0, |e| e.mtime));
    h[156] = typeflag;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if let Some(Kind::CharDevice(ma, mi) | Kind::BlockDevice(ma, mi)) = e.map(|e| &e.kind) {
        octal(&mut h[329..337], u64::from(*ma));
        octal(&mut h[337..345], u64::from(*mi));
    }
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    octal(&mut h[148..155], sum);
    h[155] = b' ';
    h
}

fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

fn write_entry(out: &mut Vec<u8>, e: &Entry) {
    let (typeflag, data, link): (u8, &[u8], &[u8]) = match &e.kind {
        Kind::File(d) => (b'0', d, b""),
        Kind::Dir => (b'5', b"", b""),
        Kind::Symlink(t) => (b'2', b"", t),
        Kind::HardLink(t) => (b'1', b"", t),
        Kind::Fifo => (b'6', b"", b""),
        Kind::CharDevice(..) => (b'3', b"", b""),
        Kind::BlockDevice(..) => (b'4', b"", b""),
    };
    let mut pax = Vec::new();
    if e.path.len() > 100 {
        pax.extend(pax_record(b"path", &e.path));
    }
    if link.len() > 100 {
        pax.extend(pax_record(b"linkpath", link));
    }
    for (k, v) in &e.xattrs {
        pax.extend(pax_record(format!("SCHILY.xattr.{k}").as_bytes(), v));
    }
    if !pax.is_empty() {
        out.extend_from_slice(&header(
            b"././@PaxHeader",
            b'x',
            pax.len() as u64,
            b"",
            None,
        ));
        out.extend_from_slice(&pax);
        pad(out);
    }
    out.extend_from_slice(&header(&e.path, typeflag, data.len() as u64, link, Some(e)));
    out.extend_from_slice(data);
    pad(out);
}

/// Compresses a tar as a layer blob would be.
pub fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = enc.write_all(tar);
            enc.finish().unwrap_or_default()
        }
        Compression::Zstd => zstd::encode_all(tar, 1).unwrap_or_default(),
    }
}

fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

struct BuiltLayer {
    blob: Vec<u8>,
    diff_id: Digest,
    compression: Compression,
}

/// Builds an image (config + layers) and writes it as an OCI layout.
pub struct ImageBuilder {
    layers: Vec<BuiltLayer>,
    pub config: serde_json::Value,
    pub os: String,
    pub architecture: String,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        ImageBuilder::new()
    }
}

/// What [`ImageBuilder::write_layout`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layer_digests: Vec<Digest>,
}

impl ImageBuilder {
    pub fn new() -> ImageBuilder {
        ImageBuilder {
            layers: Vec::new(),
            config: json!({}),
            os: "linux".into(),
            architecture: "amd64".into(),
        }
    }

    /// Adds a layer (gzip unless the layer says otherwise).
    pub fn layer(self, l: LayerBuilder) -> Self {
        let c = l.compression.unwrap_or(Compression::Gzip);
        self.raw_layer(&l.tar(), c)
    }

    /// Adds a layer from raw tar bytes, whatever they hold.
    pub fn raw_layer(mut self, tar: &[u8], c: Compression) -> Self {
        self.layers.push(BuiltLayer {
            blob: compress(tar, c),
            diff_id: Digest::of(tar),
            compression: c,
        });
        self
    }

    /// Adds a layer whose blob is given as is, with the diff_id to claim for it.
    pub fn raw_blob(mut self, blob: Vec<u8>, diff_id: Digest, c: Compression) -> Self {
        self.layers.push(BuiltLayer {
            blob,
            diff_id,
            compression: c,
        });
        self
    }

    fn set(mut self, key: &str, v: serde_json::Value) -> Self {
        self.config[key] = v;
        self
    }
    pub fn entrypoint(self, v: &[&str]) -> Self {
        self.set("Entrypoint", json!(v))
    }
    pub fn cmd(self, v: &[&str]) -> Self {
        self.set("Cmd", json!(v))
    }
    pub fn env(self, v: &[&str]) -> Self {
        self.set("Env", json!(v))
    }
    pub fn working_dir(self, v: &str) -> Self {
        self.set("WorkingDir", json!(v))
    }
    pub fn user(self, v: &str) -> Self {
        self.set("User", json!(v))
    }
    pub fn labels(self, v: &BTreeMap<String, String>) -> Self {
        self.set("Labels", json!(v))
    }
    pub fn platform(mut self, os: &str, arch: &str) -> Self {
        self.os = os.into();
        self.architecture = arch.into();
        self
    }

    /// Writes config, layers and manifest blobs into `dir`'s `blobs/sha256` and returns
    /// the manifest's descriptor JSON (without annotations) and what was written.
    pub fn write_blobs(&self, dir: &Path) -> io::Result<(serde_json::Value, Written)> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs)?;
        let put = |bytes: &[u8]| -> io::Result<Digest> {
            let d = Digest::of(bytes);
            fs::write(blobs.join(d.hex()), bytes)?;
            Ok(d)
        };
        let config = json!({
            "created": "2026-01-01T00:00:00Z",
            "architecture": self.architecture,
            "os": self.os,
            "config": self.config,
            "rootfs": {
                "type": "layers",
                "diff_ids": self.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            },
        });
        let config_bytes = serde_json::to_vec(&config)?;
        let config_digest = put(&config_bytes)?;
        let mut layer_descs = Vec::new();
        let mut layer_digests = Vec::new();
        for l in &self.layers {
            let d = put(&l.blob)?;
            layer_descs.push(json!({
                "mediaType": media_type(l.compression),
                "digest": d.to_string(),
                "size": l.blob.len(),
            }));
            layer_digests.push(d);
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config_bytes.len(),
            },
            "layers": layer_descs,
        });
        let manifest_bytes = serde_json::to_vec(&manifest)?;
        let manifest_digest = put(&manifest_bytes)?;
        let desc = json!({
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest.to_string(),
            "size": manifest_bytes.len(),
            "platform": {"os": self.os, "architecture": self.architecture},
        });
        Ok((
            desc,
            Written {
                manifest_digest,
                config_digest,
                layer_digests,
            },
        ))
    }

    /// Writes an OCI layout in `dir` whose index.json tags this image `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> io::Result<Written> {
        let (mut desc, written) = self.write_blobs(dir)?;
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        write_index(dir, vec![desc])?;
        Ok(written)
    }
}

/// Writes `oci-layout` and an `index.json` listing `manifests`.
pub fn write_index(dir: &Path, manifests: Vec<serde_json::Value>) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)
}

/// Writes a multi-platform image: each image's manifest, an image index over them
/// (as a blob), and `index.json` tagging that index `tag`. Returns the index digest and
/// what each image wrote.
pub fn write_multi_platform(
    dir: &Path,
    tag: &str,
    images: &[ImageBuilder],
) -> io::Result<(Digest, Vec<Written>)> {
    let mut descs = Vec::new();
    let mut written = Vec::new();
    for img in images {
        let (d, w) = img.write_blobs(dir)?;
        descs.push(d);
        written.push(w);
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs});
    let bytes = serde_json::to_vec(&index)?;
    let digest = Digest::of(&bytes);
    fs::write(dir.join("blobs/sha256").join(digest.hex()), &bytes)?;
    write_index(
        dir,
        vec![json!({
            "mediaType": OCI_INDEX,
            "digest": digest.to_string(),
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })],
    )?;
    Ok((digest, written))
}
