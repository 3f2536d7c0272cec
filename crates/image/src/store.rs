//! The store on disk, under `<state_dir>/images/`:
//!
//! ```text
//! lock                   shared by readers/importers, exclusive for rm/prune
//! refs.json              name -> manifest digest
//! blobs/sha256/<hex>     verified manifests, configs and layers
//! images/<hex>.json      one record per image (manifest digest)
//! disks/<hex>.<fstype>   guest filesystem images, cached by manifest digest
//! locks/<hex>.lock       serializes building one image's disk
//! tmp/                   partial files and unpack trees, never visible elsewhere
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use gpucell_common::{AtomicFile, FileLock};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, instrument, warn};

use crate::archive::{self, DockerArchive};
use crate::blobs::BlobStore;
use crate::digest::Digest;
use crate::fsimage::FsType;
use crate::manifest::{self, Document, ImageConfig, Layer};
use crate::reference::Reference;
use crate::registry::{Registry, RegistryOptions};
use crate::source::{Files, Layout, Source};
use crate::unpack::Limits;
use crate::Error;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store {path}: {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("image store file {path} is corrupt; remove it (or run `gpucell image prune`)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("image {reference:?} is not in the store; pull it first (`gpucell pull {reference}`)")]
    NotFound { reference: String },
    #[error("image reference {reference:?} matches several stored images; use more of the digest")]
    AmbiguousPrefix { reference: String },
    #[error("image {reference}: built for {os}/{arch}, but guests run linux/amd64")]
    WrongPlatform {
        reference: String,
        os: String,
        arch: String,
    },
    #[error(
        "image {reference}: {digest} is an index, not an image manifest, after platform selection"
    )]
    NestedIndex { reference: String, digest: Digest },
    #[error("the streamed import stopped before its last layer")]
    PipelineStopped,
    #[error("image store option {key}: {why}")]
    BadOption { key: &'static str, why: String },
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { path, op, source }
}

/// Store settings beyond its location. [`Store::open`] uses the defaults; a caller with
/// configuration builds them, or reads them from a config file (unknown keys are refused),
/// and passes them to [`Store::open_with`], which checks them ([`StoreOptions::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// Caps on unpacking (`max_bytes`, `max_entries`).
    pub limits: Limits,
    /// Filesystem of the guest disks (`erofs`, the default, or `ext4`).
    pub fs_type: FsType,
    /// Where unpack trees go (`None`: /dev/shm when the tree fits, else the store's tmp/).
    pub unpack_dir: Option<PathBuf>,
    /// Credentials and transport for registry pulls.
    pub registry: RegistryOptions,
    /// A registry image fetched for a run ([`Store::get_or_fetch`]) is unpacked while its
    /// later layers still download, and its guest disk written in the same pass
    /// (`true`, the default); `false`: download every layer, then unpack, then write.
    pub stream: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            limits: Limits::default(),
            fs_type: FsType::Erofs,
            unpack_dir: None,
            registry: RegistryOptions::default(),
            stream: true,
        }
    }
}

impl StoreOptions {
    /// Refuses values no store can work with, naming the key.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |key: &'static str, why: &str| StoreError::BadOption {
            key,
            why: why.to_owned(),
        };
        if self.limits.max_bytes == 0 {
            return Err(bad(
                "limits.max_bytes",
                "must be a positive number of bytes",
            ));
        }
        if self.limits.max_entries == 0 {
            return Err(bad(
                "limits.max_entries",
                "must be a positive number of entries",
            ));
        }
        if self
            .unpack_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(bad(
                "unpack_dir",
                "must not be empty (leave it out for the default)",
            ));
        }
        Ok(())
    }
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The name it was asked for by (normalized).
    pub reference: String,
    /// The image manifest's digest, `sha256:...` (after choosing linux/amd64 from an index).
    pub digest: String,
    pub config: ImageConfig,
    pub config_digest: String,
    pub layers: Vec<Layer>,
    /// Sum of the (compressed) layer sizes.
    pub size: u64,
    /// `created` from the image config, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

/// The guest's root disk for one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDisk {
    pub path: PathBuf,
    /// `erofs` or `ext4`.
    pub fstype: String,
    pub size: u64,
}

/// One line of `image ls`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub names: Vec<String>,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub imported: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<GuestDisk>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    pub deleted: Vec<String>,
    pub freed_bytes: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    pub images: Vec<String>,
    pub blobs: u64,
    pub disks: u64,
    pub temp_entries: u64,
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    image: Image,
    imported: u64,
}

/// What an import does, as it happens: a test or a front end follows the pipeline
/// through [`Store::on_event`]; each event is also logged (`info`) with the
/// milliseconds since the store was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// Layer `index` (from the bottom) is in the store, its digest and size checked.
    LayerFetched { index: usize, digest: Digest },
    /// Layer `index` is applied to the unpack tree.
    LayerUnpacked { index: usize, digest: Digest },
    /// The guest filesystem image is written (not yet moved into place).
    DiskWritten { bytes: u64 },
}

type EventSink = std::sync::Arc<dyn Fn(&PullEvent) + Send + Sync>;

struct Events(Option<EventSink>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Events(set)"
        } else {
            "Events(none)"
        })
    }
}

/// The content-addressed image store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    blobs: BlobStore,
    options: StoreOptions,
    opened: Instant,
    events: Events,
    /// Background deletions of unpack trees, joined on drop.
    cleanups: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        let handles = std::mem::take(self.cleanups.get_mut().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

impl Store {
    /// Opens (creating) the store under `<state_dir>/images` with the default
    /// [`StoreOptions`].
    pub fn open(state_dir: &Path) -> Result<Store, Error> {
        Store::open_with(state_dir, StoreOptions::default())
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Waits until unpack trees of disks built by this Store are deleted (dropping the
    /// Store does the same).
    pub fn wait_for_cleanup(&self) {
        let handles = std::mem::take(&mut *self.cleanups.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    /// Opens (creating) the store under `<state_dir>/images` with `options`, refused
    /// when [`StoreOptions::validate`] refuses them.
    pub fn open_with(state_dir: &Path, options: StoreOptions) -> Result<Store, Error> {
        options.validate()?;
        // Absolute, so that disk paths handed to QEMU do not depend on the cwd.
        let state_dir = std::path::absolute(state_dir)
            .map_err(io_err(state_dir, "resolve the state directory"))?;
        let root = state_dir.join("images");
        for sub in ["blobs/sha256", "images", "disks", "locks", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p, "create the directory"))?;
        }
        let blobs = BlobStore::new(root.join("blobs/sha256"), root.join("tmp"));
        Ok(Store {
            root,
            blobs,
            options,
            opened: Instant::now(),
            events: Events(None),
            cleanups: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Calls `sink` with every [`PullEvent`] of this store's imports (from the threads
    /// doing the work).
    pub fn on_event(&mut self, sink: impl Fn(&PullEvent) + Send + Sync + 'static) {
        self.events = Events(Some(std::sync::Arc::new(sink)));
    }

    fn emit(&self, event: &PullEvent) {
        let ms = self.opened.elapsed().as_millis() as u64;
        match event {
            PullEvent::LayerFetched { index, digest } => {
                info!(index, %digest, ms, "layer fetched")
            }
            PullEvent::LayerUnpacked { index, digest } => {
                info!(index, %digest, ms, "layer unpacked")
            }
            PullEvent::DiskWritten { bytes } => info!(bytes, ms, "disk written"),
        }
        if let Some(sink) = &self.events.0 {
            sink(event);
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    fn store_lock_shared(&self) -> Result<FileLock, Error> {
        Ok(FileLock::shared(&self.root.join("lock"))?)
    }

    fn store_lock_exclusive(&self) -> Result<FileLock, Error> {
        Ok(FileLock::exclusive(&self.root.join("lock"))?)
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", digest.hex()))
    }

    fn disk_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("disks").join(format!(
            "{}.{}",
            digest.hex(),
            self.options.fs_type.as_str()
        ))
    }

    /// The image named by `reference`, importing/pulling it when it is not in the store
    /// yet (local transports: imported when their manifest is absent; registry
    /// references: pulled when absent; a stored name or digest: used).
    #[instrument(skip(self))]
    pub fn get_or_fetch(&self, reference: &str) -> Result<Image, Error> {
        let _lock = self.store_lock_shared()?;
        if let Some(image) = self.lookup(reference)? {
            let parsed = Reference::parse(reference);
            let local = matches!(
                parsed,
                Ok(Reference::OciLayout { .. }
                    | Reference::OciArchive { .. }
                    | Reference::DockerArchive { .. })
            );
            if !local {
                return Ok(image);
            }
        }
        self.fetch(&Reference::parse(reference)?, reference, true)
    }

    /// Pulls or imports `reference` from its source even when a same-named image is
    /// stored (the name then moves to what the source has now).
    #[instrument(skip(self))]
    pub fn pull(&self, reference: &str) -> Result<Image, Error> {
        let _lock = self.store_lock_shared()?;
        let parsed = Reference::parse(reference)?;
        self.fetch(&parsed, reference, false)
    }

    /// `for_run`: the caller wants the guest disk next, so a registry pull builds it as
    /// the layers arrive ([`StoreOptions::stream`]).
    fn fetch(&self, parsed: &Reference, given: &str, for_run: bool) -> Result<Image, Error> {
        let name = parsed.canonical();
        match parsed {
            Reference::OciLayout { dir, tag } => {
                let src = Layout {
                    name: name.clone(),
                    files: Files::Dir(dir.clone()),
                    tag: tag.clone(),
                };
                self.import(&src, &name)
            }
            Reference::OciArchive { file, tag } => {
                let tmp = self.tempdir("archive-")?;
                let files = archive::extract(file, tmp.path())?;
                let src = Layout {
                    name: name.clone(),
                    files: Files::Map(files),
                    tag: tag.clone(),
                };
                self.import(&src, &name)
            }
            Reference::DockerArchive { file, tag } => {
                let tmp = self.tempdir("archive-")?;
                let files = archive::extract(file, tmp.path())?;
                let src = DockerArchive::open(name.clone(), files, tag.as_deref())?;
                self.import(&src, &name)
            }
            Reference::Registry(r) => {
                let src = Registry::new(r.clone(), &self.options.registry)?;
                self.import_with(&src, &name, for_run && self.options.stream)
            }
            Reference::Digest(_) => Err(StoreError::NotFound {
                reference: given.into(),
            }
            .into()),
        }
    }

    fn tempdir(&self, prefix: &str) -> Result<tempfile::TempDir, Error> {
        let tmp = self.root.join("tmp");
        Ok(tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&tmp)
            .map_err(io_err(&tmp, "create a temporary directory"))?)
    }

    /// Imports what `src` names and records it under `name`.
    pub fn import(&self, src: &dyn Source, name: &str) -> Result<Image, Error> {
        self.import_with(src, name, false)
    }

    /// [`Store::import`], and with `streamed` the guest disk too, each layer unpacked as
    /// soon as it is in the store while the next ones are fetched (store/stream.rs).
    pub fn import_with(
        &self,
        src: &dyn Source,
        name: &str,
        streamed: bool,
    ) -> Result<Image, Error> {
        let started = Instant::now();
        let (mut digest, mut bytes) = src.top()?;
        let mut depth = 0;
        let manifest = loop {
            match manifest::parse_document(&digest, &bytes)? {
                Document::Manifest(m) => break m,
                Document::Index(index) => {
                    depth += 1;
                    if depth > 2 {
                        return Err(manifest::ManifestError::TooDeep { digest }.into());
                    }
                    let chosen = manifest::select_platform(&digest, &index)?;
                    bytes = src.document(&chosen)?;
                    digest = chosen;
                }
            }
        };
        if let Some(mut image) = self.read_record(&digest)? {
            if self.blobs.contains(&digest)
                && image.layers.iter().all(|l| self.blobs.contains(&l.digest))
            {
                self.set_ref(name, &digest)?;
                image.reference = name.into();
                debug!(%digest, "already in the store");
                return Ok(image);
            }
            warn!(%digest, "stored image is missing blobs; fetching them again");
        }
        let config_digest = manifest::config_digest(&digest, &manifest)?;
        let config_bytes = src.config(&config_digest, manifest.config().size())?;
        let config = manifest::parse_config(&config_digest, &config_bytes)?;
        let layers = manifest::layers_of(&digest, &manifest, &config_digest, &config)?;
        let runtime = manifest::runtime_config(&config);
        if runtime.os != "linux" || runtime.architecture != "amd64" {
            return Err(StoreError::WrongPlatform {
                reference: name.into(),
                os: runtime.os,
                arch: runtime.architecture,
            }
            .into());
        }
        let image = Image {
            reference: name.into(),
            digest: digest.to_string(),
            size: layers.iter().map(|l| l.size).sum(),
            created: config.created().clone(),
            config: runtime,
            config_digest: config_digest.to_string(),
            layers,
        };
        // Held until the disk is in place, so no other process builds the same one.
        let mut streaming = None;
        if streamed && self.cached_disk(&digest).is_none() {
            let lock = self.build_lock(&digest)?;
            if self.cached_disk(&digest).is_none() {
                streaming = Some((lock, self.stream_disk(src, &image)?));
            }
        }
        if streaming.is_none() {
            self.fetch_layers(src, &image.layers)?;
        }
        self.blobs.insert_bytes(&config_bytes)?;
        self.blobs.insert_bytes(&bytes)?;
        let record = Record {
            image: image.clone(),
            imported: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|source| StoreError::Corrupt {
            path: self.record_path(&digest),
            source,
        })?;
        self.write_atomic(&self.record_path(&digest), &json)?;
        if let Some((_lock, built)) = streaming {
            // After the record: a disk in disks/ always has its image.
            let disk = self.place_disk(&built.disk, &digest)?;
            debug!(path = %disk.path.display(), "guest disk built while pulling");
        }
        self.set_ref(name, &digest)?;
        info!(%digest, name, elapsed_ms = started.elapsed().as_millis() as u64, "image imported");
        Ok(image)
    }

    /// The sequential path: every missing layer into the store, one after the other.
    fn fetch_layers(&self, src: &dyn Source, layers: &[Layer]) -> Result<(), Error> {
        for (index, layer) in layers.iter().enumerate() {
            if !self.blobs.contains(&layer.digest) {
                src.blob_into(&layer.digest, layer.size, &self.blobs)?;
            }
            self.emit(&PullEvent::LayerFetched {
                index,
                digest: layer.digest.clone(),
            });
        }
        Ok(())
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), Error> {
        // Temporary files in tmp/ (which prune sweeps), under the one rule of
        // gpucell_common::atomic.
        let tmp_dir = self.root.join("tmp");
        let mut file = AtomicFile::create_in(path, &tmp_dir)
            .map_err(io_err(&tmp_dir, "create a temporary file"))?;
        file.write_all(bytes)
            .map_err(io_err(file.temp_path(), "write"))?;
        file.commit()
            .map_err(io_err(path, "sync and rename into place"))?;
        Ok(())
    }

    fn read_record(&self, digest: &Digest) -> Result<Option<Image>, Error> {
        let path = self.record_path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, "read")(e).into()),
        };
        let record: Record = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Corrupt { path, source })?;
        Ok(Some(record.image))
    }

    fn records(&self) -> Result<Vec<(Digest, Record)>, Error> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "list"))? {
            let entry = entry.map_err(io_err(&dir, "list"))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(digest) = Digest::from_hex(hex) else {
                continue;
            };
            let path = entry.path();
            let bytes = fs::read(&path).map_err(io_err(&path, "read"))?;
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) => out.push((digest, r)),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping a corrupt image record")
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    fn read_refs(&self) -> Result<BTreeMap<String, Digest>, Error> {
        let path = self.refs_path();
        match fs::read(&path) {
            Ok(b) => Ok(serde_json::from_slice(&b)
                .map_err(|source| StoreError::Corrupt { path, source })?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path, "read")(e).into()),
        }
    }

    fn update_refs(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Digest>),
    ) -> Result<BTreeMap<String, Digest>, Error> {
        let _l = FileLock::exclusive(&self.root.join("locks/refs.lock"))?;
        let mut refs = self.read_refs()?;
        f(&mut refs);
        let json = serde_json::to_vec_pretty(&refs).map_err(|source| StoreError::Corrupt {
            path: self.refs_path(),
            source,
        })?;
        self.write_atomic(&self.refs_path(), &json)?;
        Ok(refs)
    }

    fn set_ref(&self, name: &str, digest: &Digest) -> Result<(), Error> {
        if self.read_refs()?.get(name) == Some(digest) {
            return Ok(());
        }
        self.update_refs(|r| {
            r.insert(name.into(), digest.clone());
        })?;
        Ok(())
    }

    /// Resolves a stored name, its normalized form, a digest or a unique hex prefix
    /// (at least 12 digits) of one, without any fetching.
    pub fn resolve(&self, reference: &str) -> Result<Option<Digest>, Error> {
        let refs = self.read_refs()?;
        if let Some(d) = refs.get(reference) {
            return Ok(Some(d.clone()));
        }
        if let Ok(parsed) = Reference::parse(reference) {
            if let Reference::Digest(d) = &parsed {
                return Ok(self.record_path(d).is_file().then(|| d.clone()));
            }
            if let Some(d) = refs.get(&parsed.canonical()) {
                return Ok(Some(d.clone()));
            }
        }
        if reference.len() >= 12
            && reference.len() <= 64
            && reference
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            let matches: Vec<Digest> = self
                .records()?
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| d.hex().starts_with(reference))
                .collect();
            return match matches.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(one.clone())),
                _ => Err(StoreError::AmbiguousPrefix {
                    reference: reference.into(),
                }
                .into()),
            };
        }
        Ok(None)
    }

    fn lookup(&self, reference: &str) -> Result<Option<Image>, Error> {
        let Some(d) = self.resolve(reference)? else {
            return Ok(None);
        };
        Ok(self.read_record(&d)?.map(|mut i| {
            i.reference = reference.into();
            i
        }))
    }

    /// A stored image, without fetching.
    pub fn inspect(&self, reference: &str) -> Result<Image, Error> {
        self.lookup(reference)?.ok_or_else(|| {
            StoreError::NotFound {
                reference: reference.into(),
            }
            .into()
        })
    }

    /// The names pointing at `digest`.
    pub fn names_of(&self, digest: &str) -> Result<Vec<String>, Error> {
        Ok(self
            .read_refs()?
            .into_iter()
            .filter(|(_, d)| d.to_string() == digest)
            .map(|(n, _)| n)
            .collect())
    }

    /// The cached guest disk of `image`, if built.
    pub fn cached_disk(&self, image_digest: &Digest) -> Option<GuestDisk> {
        let path = self.disk_path(image_digest);
        let md = fs::metadata(&path).ok()?;
        Some(GuestDisk {
            path,
            fstype: self.options.fs_type.as_str().into(),
            size: md.len(),
        })
    }

    /// Every stored image with its names.
    pub fn list(&self) -> Result<Vec<ImageSummary>, Error> {
        let refs = self.read_refs()?;
        Ok(self
            .records()?
            .into_iter()
            .map(|(d, r)| ImageSummary {
                names: refs
                    .iter()
                    .filter(|(_, x)| **x == d)
                    .map(|(n, _)| n.clone())
                    .collect(),
                digest: d.to_string(),
                size: r.image.size,
                created: r.image.created,
                imported: r.imported,
                disk: self.cached_disk(&d),
            })
            .collect())
    }
}

mod disk;
mod fsck;
mod gc;
mod stream;
