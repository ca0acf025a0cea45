//! Snapshot storage: files a VMM wrote become objects in a store and come
//! back, streamed in chunks (never a whole memory image in RAM) and
//! checksummed (SHA-256, verified on every read).
//!
//! The store is the `object_store` abstraction: a directory under the data
//! dir by default, an S3-compatible bucket when `HATCH_S3_BUCKET` is set. Keys
//! follow the Hatch API's layout: `snapshots/{vm_id}/{snap_id}/{vmstate|memory|disk}`;
//! content-defined chunks live under `chunks/{owner}/` (chunks.rs).

mod chunks;
mod compress;
mod counted;
#[cfg(test)]
pub(crate) mod testing;

pub use chunks::{
    ChunkHash, ChunkRef, ChunkSizes, Chunked, ListedChunk, ParseChunkHashError, StoredChunk,
    CHUNKS_IN_FLIGHT, FILE_CHUNK,
};
pub use compress::{Algorithm, CompressionConfig};
pub use counted::Transfer;

use crate::config::{Config, S3Config};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadBuf};
use tokio_util::io::StreamReader;

/// Size of an uploaded part. S3 wants at least 5 MiB for every part but the last.
const CHUNK: usize = 8 << 20;
/// Parts uploading at once: memory stays about this many chunks whatever the object size.
const PARTS_IN_FLIGHT: usize = 4;
/// Buffer for copying between a reader and a file or an upload.
const COPY_BUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object {0} is missing from the snapshot store")]
    Missing(String),
    #[error("object {key} is corrupt: expected {expected}, found {actual}")]
    Corrupt {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("snapshot store: {0}")]
    Store(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, ObjectError>;

/// What a stored object is: its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

pub fn key(vm_id: &str, snap_id: &str, part: &str) -> String {
    format!("snapshots/{vm_id}/{snap_id}/{part}")
}

pub fn prefix_of_vm(vm_id: &str) -> String {
    format!("snapshots/{vm_id}/")
}

/// The record of a snapshot being captured: keys laid out as the Hatch API says,
/// nothing stored yet, not usable until marked ready.
pub fn capturing_record(
    id: &str,
    vm_id: &str,
    owner_id: &str,
    kind: crate::domain::SnapshotKind,
    hypervisor: &str,
    vm_config: crate::domain::VmConfig,
) -> crate::store::Snapshot {
    crate::store::Snapshot {
        id: id.to_string(),
        vm_id: vm_id.to_string(),
        owner_id: owner_id.to_string(),
        kind,
        name: None,
        tags: Default::default(),
        status: crate::domain::SnapshotStatus::Capturing,
        source_hypervisor: hypervisor.to_string(),
        source_instance_name: None,
        vm_config: crate::domain::Json(vm_config),
        state_key: key(vm_id, id, "vmstate"),
        memory_key: key(vm_id, id, "memory"),
        disk_key: key(vm_id, id, "disk"),
        state_sha256: None,
        state_size: None,
        memory_sha256: None,
        memory_size: None,
        disk_sha256: None,
        disk_size: None,
        size_bytes: 0,
        compression: None,
        compression_state: crate::domain::CompressionState::None,
        compressed_size_bytes: None,
        compression_error: None,
        created_at: crate::store::now(),
        compressed_key: None,
        compressed_sha256: None,
        layout: crate::store::CHUNKED.into(),
    }
}

/// Where snapshot objects live; cheap to clone.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    description: String,
    /// The directory of a local store (None for S3).
    local_root: Option<std::path::PathBuf>,
    /// Bytes moved to and from the store (the daemon's metrics).
    transfer: Arc<Transfer>,
}

fn store_err(e: object_store::Error) -> ObjectError {
    ObjectError::Store(e.to_string())
}

/// A failure reading an object's body. Store errors travel through the readers as
/// `io::Error`s; they are unwrapped here so they are reported like the same error at `get`.
fn read_err(key: &str, e: io::Error) -> ObjectError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<object_store::Error>())
    {
        Some(object_store::Error::NotFound { .. }) => ObjectError::Missing(key.to_string()),
        Some(store) => ObjectError::Store(store.to_string()),
        None => ObjectError::Io(e),
    }
}

fn describe_stored(s: &Stored) -> String {
    format!("sha256 {} ({} bytes)", s.sha256, s.size)
}

/// `Ok` when what arrived is what was recorded.
fn check(key: &str, what: &str, expected: &Stored, actual: &Stored) -> Result<()> {
    if expected == actual {
        return Ok(());
    }
    Err(ObjectError::Corrupt {
        key: key.to_string(),
        expected: format!("{what}{}", describe_stored(expected)),
        actual: format!("{what}{}", describe_stored(actual)),
    })
}

/// Counts and hashes every byte read through it.
struct Tallied<R> {
    inner: R,
    hash: Sha256,
    size: u64,
}

impl<R> Tallied<R> {
    fn new(inner: R) -> Self {
        Tallied {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    fn tally(&self) -> Stored {
        Stored {
            size: self.size,
            sha256: hex::encode(self.hash.clone().finalize()),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Tallied<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let new = &buf.filled()[before..];
            this.hash.update(new);
            this.size += new.len() as u64;
        }
        polled
    }
}

type Body = StreamReader<BoxStream<'static, io::Result<Bytes>>, Bytes>;

/// Moves `tmp` to `dest` if `verdict` is Ok, else removes it: `dest` only ever holds
/// verified bytes.
async fn settle(tmp: &Path, dest: &Path, verdict: Result<()>) -> Result<()> {
    match verdict {
        Ok(()) => Ok(tokio::fs::rename(tmp, dest).await?),
        Err(e) => {
            let _ = tokio::fs::remove_file(tmp).await;
            Err(e)
        }
    }
}

/// Copies `body` into `out` in large pieces; read errors go through `on_read`.
async fn copy_into(
    body: &mut (impl AsyncRead + Unpin),
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    on_read: impl Fn(io::Error) -> ObjectError,
) -> Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = read_full(body, &mut buf).await.map_err(&on_read)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).await?;
    }
    out.flush().await?;
    Ok(())
}

/// Reads until `buf` is full or the stream ends. A pipe hands out at most
/// its buffer per read; writing each piece to a file on its own would cost a
/// blocking-pool round trip per few KiB.
async fn read_full(body: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = body.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Where the local store keeps `key` (keys are `/`-separated relative paths we make).
fn local_path(root: &Path, key: &str) -> std::path::PathBuf {
    root.join(key)
}

/// Writes `body` to `dest` so that it is on disk when this returns: written to
/// a `#`-named staging file beside it (swept at start-up if we die), writeback
/// started every part so the final flush is short, fdatasync, rename, and
/// fsync of the directory so the name survives a power loss too. A snapshot
/// whose VM is gone is the VM's only copy: "stored" must mean durable.
async fn write_durably(
    dest: &Path,
    body: impl AsyncRead + Unpin,
    on_read: impl Fn(io::Error) -> ObjectError,
) -> Result<Stored> {
    let dir = dest
        .parent()
        .ok_or_else(|| ObjectError::Store(format!("{} has no directory", dest.display())))?
        .to_path_buf();
    tokio::fs::create_dir_all(&dir).await?;
    let staging = dest.with_file_name(format!(
        "{}#{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut body = Tallied::new(body);
    let result = async {
        let mut out = tokio::fs::File::create(&staging).await?;
        let mut buf = vec![0u8; COPY_BUF];
        let (mut flushed, mut written) = (0u64, 0u64);
        loop {
            let n = read_full(&mut body, &mut buf).await.map_err(&on_read)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).await?;
            written += n as u64;
            if written - flushed >= CHUNK as u64 {
                out.flush().await?;
                start_writeback(&out, flushed, written - flushed);
                flushed = written;
            }
        }
        out.flush().await?;
        out.sync_data().await?;
        drop(out);
        tokio::fs::rename(&staging, dest).await?;
        tokio::fs::File::open(&dir).await?.sync_all().await?;
        Ok(body.tally())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&staging).await;
    }
    result
}

/// Asks the kernel to start writing a range out now (without waiting), so
/// the fdatasync at the end has little left to do.
fn start_writeback(file: &tokio::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the duration of the call; sync_file_range
    // only reads its arguments and a failure is harmless (the final
    // fdatasync still writes everything).
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn partial_path(dest: &Path) -> std::path::PathBuf {
    dest.with_extension("partial")
}

impl Objects {
    /// The store the configuration names: the S3 bucket when set, else `data_dir/objects`.
    pub fn from_config(cfg: &Config) -> Result<Objects> {
        match &cfg.s3 {
            Some(s3) => Objects::s3(s3),
            None => Objects::local(&cfg.data_dir.join("objects")),
        }
    }

    /// A store in a local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Objects> {
        std::fs::create_dir_all(dir)?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(store_err)?;
        let transfer = Arc::new(Transfer::default());
        Ok(Objects {
            store: Arc::new(counted::Counted::new(Arc::new(fs), Arc::clone(&transfer))),
            description: format!("local directory {}", dir.display()),
            local_root: Some(dir.to_path_buf()),
            transfer,
        })
    }

    /// A store in an S3 bucket. Nothing is contacted yet: a wrong endpoint or key shows up at
    /// the first snapshot.
    pub fn s3(s3: &S3Config) -> Result<Objects> {
        // No limit on a whole request: a memory image streams for as long as
        // its consumer (a compressor at zstd 19, a loading VMM) takes, far
        // beyond the client's default 30 s. A connection that goes silent
        // still fails, through the connect and read timeouts.
        let client = object_store::ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(std::time::Duration::from_secs(10))
            .with_read_timeout(std::time::Duration::from_secs(60));
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_client_options(client)
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_access_key_id(&s3.access_key)
            .with_secret_access_key(&s3.secret_key)
            // Path-style (`endpoint/bucket/key`): what MinIO and s3s-fs serve without DNS tricks.
            .with_virtual_hosted_style_request(false);
        let description = match &s3.endpoint {
            Some(endpoint) => {
                // A self-hosted server on a private network often speaks plain HTTP.
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
                format!("s3://{} at {endpoint}", s3.bucket)
            }
            None => format!("s3://{} (AWS, region {})", s3.bucket, s3.region),
        };
        let transfer = Arc::new(Transfer::default());
        let s3 = Arc::new(builder.build().map_err(store_err)?);
        Ok(Objects {
            store: Arc::new(counted::Counted::new(s3, Arc::clone(&transfer))),
            description,
            local_root: None,
            transfer,
        })
    }

    /// Removes what uploads a crash cut short left behind. The local store
    /// stages a multipart upload as `{key}#{n}` beside the key and renames it
    /// when complete; our keys never contain `#`. (S3 keeps incomplete
    /// multipart uploads out of listings; a bucket lifecycle rule ends them.)
    /// Call only while no upload runs, i.e. at start-up.
    pub async fn remove_unfinished_uploads(&self) -> Result<usize> {
        let Some(root) = self.local_root.clone() else {
            return Ok(0);
        };
        let removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            let mut dirs = vec![root];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir)?.flatten() {
                    let path = entry.path();
                    if entry.file_type()?.is_dir() {
                        dirs.push(path);
                    } else if entry.file_name().to_string_lossy().contains('#') {
                        std::fs::remove_file(&path)?;
                        removed += 1;
                    }
                }
            }
            Ok::<_, std::io::Error>(removed)
        })
        .await
        .map_err(|e| ObjectError::Store(e.to_string()))??;
        Ok(removed)
    }

    /// Where objects go, for the start-up log.
    pub fn describe(&self) -> String {
        self.description.clone()
    }

    /// The bytes this store has moved up and down (shared: it keeps counting).
    pub fn transfer(&self) -> Arc<Transfer> {
        Arc::clone(&self.transfer)
    }

    /// The body of `key` as a buffered reader.
    async fn open(&self, key: &str) -> Result<Body> {
        if let Some(root) = &self.local_root {
            // Read the file directly in large pieces: object_store's local
            // reader goes in 8 KiB chunks, each a blocking-pool round trip,
            // which made a restore several times slower than the disk.
            let file = match tokio::fs::File::open(local_path(root, key)).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ObjectError::Missing(key.to_string()))
                }
                Err(e) => return Err(e.into()),
            };
            let transfer = Arc::clone(&self.transfer);
            let stream = tokio_util::io::ReaderStream::with_capacity(file, COPY_BUF)
                .inspect(move |piece| {
                    if let Ok(bytes) = piece {
                        transfer.add_down(bytes.len() as u64);
                    }
                })
                .boxed();
            return Ok(StreamReader::new(stream));
        }
        let got = match self.store.get(&ObjPath::from(key)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ObjectError::Missing(key.to_string()))
            }
            Err(e) => return Err(store_err(e)),
        };
        let stream = got
            .into_stream()
            .map(|r| r.map_err(io::Error::from))
            .boxed();
        Ok(StreamReader::new(stream))
    }

    /// Streams `body` into `key` as a multipart upload and returns what was stored. A failed
    /// upload is aborted, so no half object and no orphaned parts stay in the bucket.
    async fn upload(
        &self,
        key: &str,
        body: impl AsyncRead + Unpin,
        on_read: impl Fn(io::Error) -> ObjectError,
    ) -> Result<Stored> {
        if let Some(root) = &self.local_root {
            let stored = write_durably(&local_path(root, key), body, on_read).await?;
            self.transfer.add_up(stored.size);
            return Ok(stored);
        }
        let mut body = Tallied::new(body);
        let upload = self
            .store
            .put_multipart(&ObjPath::from(key))
            .await
            .map_err(store_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = match body.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(on_read(e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = writer.abort().await;
                return Err(store_err(e));
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(store_err)?;
        Ok(body.tally())
    }

    /// Streams `file` into `key`, hashing as it goes.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<Stored> {
        let f = tokio::fs::File::open(file).await?;
        self.upload(key, f, ObjectError::Io).await
    }

    /// Streams `key` into `dest` and checks it against `expected`. `dest`
    /// appears only once the whole object arrived intact.
    pub async fn get_file(&self, key: &str, dest: &Path, expected: &Stored) -> Result<()> {
        self.get_into_file(key, dest, expected, None).await
    }

    /// `stream_to` a `.partial` file beside `dest`, renamed to `dest` only
    /// once every check passed.
    async fn get_into_file(
        &self,
        key: &str,
        dest: &Path,
        stored: &Stored,
        decompress: Option<(Algorithm, &Stored)>,
    ) -> Result<()> {
        let tmp = partial_path(dest);
        let verdict = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            self.stream_to(key, &mut out, stored, decompress).await
        }
        .await;
        settle(&tmp, dest, verdict).await
    }

    /// Stores a compressed copy of `src_key` at `dst_key`, streaming: the source is read,
    /// compressed and uploaded a chunk at a time. Returns the size and checksum of the
    /// compressed bytes, which is what `get_file_decompressed` verifies. `level` must be in
    /// the algorithm's range (see `CompressionConfig::validate`).
    pub async fn compress(
        &self,
        src_key: &str,
        dst_key: &str,
        algorithm: Algorithm,
        level: i32,
    ) -> Result<Stored> {
        debug_assert!(
            algorithm.levels().contains(&i64::from(level)),
            "{algorithm} level {level}"
        );
        let raw = self.open(src_key).await?;
        self.upload(dst_key, algorithm.encoder(level, raw), |e| {
            read_err(src_key, e)
        })
        .await
    }

    /// Streams the compressed object `key` into `dest`, decompressing on the way. Both ends
    /// are verified: the compressed bytes against `stored`, the decompressed ones against
    /// `raw` (the checksum of the memory before compression). `dest` appears only if both
    /// match; a stream the decoder rejects is reported as corrupt too.
    pub async fn get_file_decompressed(
        &self,
        key: &str,
        dest: &Path,
        stored: &Stored,
        algorithm: Algorithm,
        raw: &Stored,
    ) -> Result<()> {
        self.get_into_file(key, dest, stored, Some((algorithm, raw)))
            .await
    }

    /// Streams the object `key` into `out` (a pipe a VMM loads guest memory
    /// from), decompressing it first when `decompress` names the algorithm
    /// and the checksum of the uncompressed bytes. Verified like `get_file`
    /// and `get_file_decompressed`; the verdict comes after the last byte.
    pub async fn stream_to(
        &self,
        key: &str,
        out: &mut (impl tokio::io::AsyncWrite + Unpin),
        stored: &Stored,
        decompress: Option<(Algorithm, &Stored)>,
    ) -> Result<()> {
        let mut body = Tallied::new(self.open(key).await?);
        let Some((algorithm, raw)) = decompress else {
            copy_into(&mut body, out, |e| read_err(key, e)).await?;
            return check(key, "", stored, &body.tally());
        };
        let decoded = {
            let mut decoded =
                Tallied::new(algorithm.decoder(BufReader::with_capacity(COPY_BUF, &mut body)));
            copy_into(&mut decoded, out, |e| match read_err(key, e) {
                // Not from the store, so from the decoder: the bytes are not a valid stream.
                ObjectError::Io(e) => ObjectError::Corrupt {
                    key: key.to_string(),
                    expected: format!("a {algorithm} stream, {}", describe_stored(stored)),
                    actual: format!("undecodable data ({e})"),
                },
                other => other,
            })
            .await?;
            decoded.tally()
        };
        // The decoder stops at the end of its frame; anything after it still counts.
        tokio::io::copy(&mut body, &mut tokio::io::sink())
            .await
            .map_err(|e| read_err(key, e))?;
        check(key, "compressed ", stored, &body.tally())
            .and_then(|()| check(key, "uncompressed ", raw, &decoded))
    }

    /// Copies `from` to `to` (a fork's objects), inside the store where it can: a hard link
    /// locally, CopyObject on S3. S3 copies at most 5 GiB in one request, so a bigger object
    /// is streamed through this process instead.
    pub async fn copy(&self, from: &str, to: &str) -> Result<()> {
        const S3_COPY_MAX: u64 = 5 << 30;
        self.copy_up_to(from, to, S3_COPY_MAX).await
    }

    /// `copy` with the largest server-side copy as a parameter, so tests reach both paths.
    async fn copy_up_to(&self, from: &str, to: &str, server_side_max: u64) -> Result<()> {
        let missing = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => ObjectError::Missing(from.to_string()),
            e => store_err(e),
        };
        let size = self
            .store
            .head(&ObjPath::from(from))
            .await
            .map_err(missing)?
            .size;
        if size <= server_side_max {
            return self
                .store
                .copy(&ObjPath::from(from), &ObjPath::from(to))
                .await
                .map_err(missing);
        }
        let body = self.open(from).await?;
        self.upload(to, body, |e| read_err(from, e)).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Keys under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = ObjPath::from(prefix.trim_end_matches('/'));
        let mut out = vec![];
        let mut items = self.store.list(Some(&p));
        while let Some(meta) = items.next().await {
            out.push(meta.map_err(store_err)?.location.to_string());
        }
        out.sort();
        Ok(out)
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let keys = self.list(prefix).await?;
        for k in &keys {
            self.delete(k).await?;
        }
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{S3sFs, TempDir};
    use super::*;
    use std::path::PathBuf;

    /// The checks every store must pass. `backing` names the file that holds a key's bytes,
    /// so corruption can be injected under the store's feet.
    async fn check_store(objects: &Objects, backing: &dyn Fn(&str) -> PathBuf, scratch: &Path) {
        let src = scratch.join("src.bin");
        // More than two parts, not a multiple of the part size.
        let data: Vec<u8> = (0..(CHUNK * 2 + 12345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let k = key("vm_a", "snap_b", "memory");
        let stored = objects.put_file(&k, &src).await.unwrap();
        assert_eq!(stored.size, data.len() as u64);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(&data)));
        assert!(std::fs::read(backing(&k)).unwrap() == data);

        // An empty object (no part at all) round-trips too.
        let empty = scratch.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        let ek = key("vm_a", "snap_b", "vmstate");
        let es = objects.put_file(&ek, &empty).await.unwrap();
        assert_eq!(es.size, 0);
        let empty_back = scratch.join("empty-back.bin");
        objects.get_file(&ek, &empty_back, &es).await.unwrap();
        assert_eq!(std::fs::read(&empty_back).unwrap(), b"");

        // A VM whose id extends vm_a's is not under vm_a's prefix.
        let other = key("vm_ab", "snap_c", "disk");
        objects.put_file(&other, &empty).await.unwrap();
        assert_eq!(
            objects.list(&prefix_of_vm("vm_a")).await.unwrap(),
            vec![k.clone(), ek.clone()]
        );

        let back = scratch.join("back.bin");
        objects.get_file(&k, &back, &stored).await.unwrap();
        assert!(std::fs::read(&back).unwrap() == data);
        assert!(!back.with_extension("partial").exists());

        // Copies, server-side and streamed, read back as the original (checked by its sums).
        let fork = key("vm_f", "snap_f", "memory");
        let streamed = key("vm_f", "snap_g", "memory");
        objects.copy(&k, &fork).await.unwrap();
        objects.copy_up_to(&k, &streamed, 0).await.unwrap();
        for c in [&fork, &streamed] {
            let out = scratch.join("copy.bin");
            objects.get_file(c, &out, &stored).await.unwrap();
            assert!(std::fs::read(&out).unwrap() == data, "{c}");
        }
        assert_eq!(
            objects.delete_prefix(&prefix_of_vm("vm_f")).await.unwrap(),
            2
        );
        let e = objects.copy("snapshots/none", &fork).await.unwrap_err();
        assert!(
            matches!(&e, ObjectError::Missing(m) if m == "snapshots/none"),
            "{e}"
        );

        // Flip one byte in the stored object: the read fails and writes nothing.
        let mut bytes = std::fs::read(backing(&k)).unwrap();
        bytes[CHUNK + 1000] ^= 1;
        std::fs::write(backing(&k), bytes).unwrap();
        let again = scratch.join("again.bin");
        let e = objects.get_file(&k, &again, &stored).await.unwrap_err();
        assert!(matches!(e, ObjectError::Corrupt { .. }), "{e}");
        assert!(!again.exists() && !again.with_extension("partial").exists());

        assert_eq!(
            objects.delete_prefix(&prefix_of_vm("vm_a")).await.unwrap(),
            2
        );
        assert_eq!(
            objects.list(&prefix_of_vm("vm_a")).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(objects.list("snapshots/").await.unwrap(), vec![other]);
        let e = objects.get_file(&k, &again, &stored).await.unwrap_err();
        assert!(matches!(e, ObjectError::Missing(_)), "{e}");
        assert!(!again.exists() && !again.with_extension("partial").exists());
        // Deleting what is gone is not an error: a retried delete must succeed.
        objects.delete(&k).await.unwrap();
    }

    #[tokio::test]
    async fn local_store_round_trip_verifies_and_detects_corruption() {
        let dir = TempDir::new("objects-local");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        assert_eq!(
            objects.describe(),
            format!("local directory {}", root.display())
        );
        check_store(&objects, &|k| root.join(k), dir.path()).await;
    }

    #[tokio::test]
    async fn unfinished_local_uploads_are_swept_and_objects_kept() {
        let dir = TempDir::new("objects-sweep");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"whole object").unwrap();
        let k = key("vm_a", "snap_b", "memory");
        objects.put_file(&k, &src).await.unwrap();
        // What object_store's local multipart staging leaves when the process dies.
        let staged = root.join(format!("{}.zstd#1", k));
        std::fs::write(&staged, b"half").unwrap();
        assert_eq!(objects.remove_unfinished_uploads().await.unwrap(), 1);
        assert!(!staged.exists());
        assert_eq!(std::fs::read(root.join(&k)).unwrap(), b"whole object");
        assert_eq!(objects.list("snapshots/").await.unwrap(), vec![k]);
    }

    #[tokio::test]
    async fn s3_store_round_trip_verifies_and_detects_corruption() {
        let s3 = S3sFs::start();
        let objects = Objects::s3(&s3.config()).unwrap();
        assert!(objects
            .describe()
            .starts_with("s3://hatch-test at http://127.0.0.1:"));
        check_store(&objects, &|k| s3.object_file(k), &s3.scratch()).await;
    }

    #[tokio::test]
    async fn s3_with_wrong_secret_is_a_store_error() {
        let s3 = S3sFs::start();
        let cfg = S3Config {
            secret_key: "not-the-secret".into(),
            ..s3.config()
        };
        let objects = Objects::s3(&cfg).unwrap();
        let src = s3.scratch().join("f");
        std::fs::write(&src, b"x").unwrap();
        let e = objects.put_file("k", &src).await.unwrap_err();
        assert!(matches!(e, ObjectError::Store(_)), "{e}");
        assert!(!s3.object_file("k").exists());
    }

    #[test]
    fn from_config_picks_the_store() {
        let dir = TempDir::new("objects-config");
        let vars = |s3: bool| {
            let mut v = vec![("HATCH_DATA_DIR", dir.path().to_str().unwrap().to_string())];
            if s3 {
                v.push(("HATCH_S3_BUCKET", "b".into()));
                v.push(("HATCH_S3_ENDPOINT", "http://127.0.0.1:9".into()));
                v.push(("HATCH_S3_ACCESS_KEY", "a".into()));
                v.push(("HATCH_S3_SECRET_KEY", "s".into()));
            }
            Config::from_lookup(|k| v.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
                .unwrap()
        };
        let local = Objects::from_config(&vars(false)).unwrap();
        assert_eq!(
            local.describe(),
            format!("local directory {}", dir.path().join("objects").display())
        );
        assert!(dir.path().join("objects").is_dir());
        let s3 = Objects::from_config(&vars(true)).unwrap();
        assert_eq!(s3.describe(), "s3://b at http://127.0.0.1:9");
    }
}
