//! Content-defined chunk store: a stream becomes FastCDC chunks stored once per owner under their BLAKE3 hash, and comes back verified chunk by chunk.

use super::{
    check, describe_stored, local_path, partial_path, read_err, settle, store_err, Algorithm,
    ObjectError, Objects, Result, Stored, Tallied, COPY_BUF,
};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Chunks being hashed, encoded or uploaded at once by `put_chunked`, and
/// chunks fetched ahead by `get_chunked`: memory stays about this many
/// maximum-size chunks whatever the stream size.
pub const CHUNKS_IN_FLIGHT: usize = 16;
/// Chunks fetched at once from S3 by `get_chunked` and `get_chunked_file`:
/// a GET of a 64 KiB chunk is mostly waiting, so more of them overlap
/// (memory stays at most this many maximum-size chunks, 16 MiB).
const FETCHES_IN_FLIGHT_REMOTE: usize = 64;
/// Bytes read from the body at a time and handed to the chunker thread.
const READ_BLOCK: usize = 512 << 10;
/// Read blocks queued for the chunker, and batches of cut chunks queued for hashing.
const BLOCKS_QUEUED: usize = 2;
/// The size of a file's chunks (`put_file_chunked`): fixed, at fixed
/// offsets, so a change to a page of a memory image or a cluster of a qcow2
/// disk changes exactly one chunk, and a capture costs no cut-point search.
pub const FILE_CHUNK: u32 = 64 << 10;
/// Bytes of a file read, hashed and handed on at once, and segments in flight.
const FILE_SEGMENT: u64 = 4 << 20;
const SEGMENTS_QUEUED: usize = 2;
/// A chunk of zeros as long as a file chunk: what a hole reads as.
static ZEROS: [u8; FILE_CHUNK as usize] = [0; FILE_CHUNK as usize];

/// The hash of `len` zero bytes, computed once for a whole file chunk.
fn zeros_hash(len: usize) -> ChunkHash {
    static FULL: std::sync::OnceLock<ChunkHash> = std::sync::OnceLock::new();
    if len == FILE_CHUNK as usize {
        *FULL.get_or_init(|| ChunkHash::of(&ZEROS))
    } else {
        ChunkHash::of(&ZEROS[..len.min(ZEROS.len())])
    }
}

/// How `chunk_stream` cuts and stores a stream.
struct Cutting {
    sizes: ChunkSizes,
    /// Each new chunk stored encoded so, or raw.
    encoding: Option<(Algorithm, i32)>,
    /// Also the SHA-256 of the whole stream (`Chunked::sha256`).
    whole_sha256: bool,
}

impl Cutting {
    /// A whole object being converted: default sizes, raw chunks.
    fn converting(whole_sha256: bool) -> Cutting {
        Cutting {
            sizes: ChunkSizes::DEFAULT,
            encoding: None,
            whole_sha256,
        }
    }
}

/// Hashed chunks in stream order, a batch at a time.
type Hashed = Vec<(ChunkHash, Bytes)>;

/// One segment of `file` (`len` bytes at `start`) as file chunks, hashed.
/// A segment with no data (a hole, as tmpfs and ext4 report it) is not read.
fn hash_segment(file: &std::fs::File, start: u64, len: u64) -> io::Result<Hashed> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let chunk = u64::from(FILE_CHUNK);
    let sizes = (0..len.div_ceil(chunk)).map(|i| chunk.min(len - i * chunk) as usize);
    // SAFETY: lseek on an fd the caller keeps open; only the (unused) offset changes.
    let data_at = unsafe { libc::lseek(file.as_raw_fd(), start as libc::off_t, libc::SEEK_DATA) };
    let hole = if data_at < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data after `start`. Other errors: read it all.
        e.raw_os_error() == Some(libc::ENXIO)
    } else {
        data_at as u64 >= start + len
    };
    if hole {
        return Ok(sizes
            .map(|n| (zeros_hash(n), Bytes::from_static(&ZEROS[..n])))
            .collect());
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, start)?;
    let buf = Bytes::from(buf);
    let mut at = 0;
    Ok(sizes
        .map(|n| {
            let raw = buf.slice(at..at + n);
            at += n;
            if is_zeros(&raw) {
                (zeros_hash(n), Bytes::from_static(&ZEROS[..n]))
            } else {
                (ChunkHash::of(&raw), raw)
            }
        })
        .collect())
}

/// The sizes FastCDC aims at. Cut points depend on them: chunks stored with
/// other sizes do not deduplicate against these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkSizes {
    pub const DEFAULT: ChunkSizes = ChunkSizes {
        min: 16 << 10,
        avg: 64 << 10,
        max: 256 << 10,
    };

    /// Within FastCDC's limits and ordered: the chunker only debug-asserts them.
    fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max
            && [min, avg, max].iter().all(|s| s % 2 == 0);
        if ok {
            Ok(())
        } else {
            Err(invalid(format!(
                "chunk sizes {self:?} are outside FastCDC's limits"
            )))
        }
    }
}

/// The BLAKE3 hash of a chunk's raw bytes: its address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(raw: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(raw).as_bytes())
    }
}

impl std::fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a chunk hash (64 lowercase hex digits)")]
pub struct ParseChunkHashError(String);

impl std::str::FromStr for ChunkHash {
    type Err = ParseChunkHashError;

    fn from_str(s: &str) -> std::result::Result<ChunkHash, ParseChunkHashError> {
        // Lowercase only: a key is one spelling of one hash.
        let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        let mut out = [0u8; 32];
        if s.len() != 64 || !s.as_bytes().iter().all(lower_hex) {
            return Err(ParseChunkHashError(s.to_string()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseChunkHashError(s.to_string()))?;
        Ok(ChunkHash(out))
    }
}

/// One manifest entry, in stream order (a hash may repeat).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub hash: ChunkHash,
    pub raw_size: u32,
}

/// A chunk as stored: what reading it back needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredChunk {
    pub hash: ChunkHash,
    pub raw_size: u32,
    pub stored_size: u32,
    pub encoding: Option<Algorithm>,
}

/// The result of chunking a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunked {
    /// The ordered manifest.
    pub entries: Vec<ChunkRef>,
    /// Chunks this call uploaded, each once, in no particular order.
    pub new: Vec<StoredChunk>,
    /// Sum of the entries' raw sizes.
    pub raw_size: u64,
    /// SHA-256 of the whole raw stream (hex), when the caller asked for it:
    /// only converting a whole object does, to check it against the checksum
    /// recorded for it. Each chunk's BLAKE3 already vouches for a capture.
    pub sha256: Option<String>,
}

/// A chunk object found in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedChunk {
    pub owner: String,
    pub hash: ChunkHash,
    pub encoding: Option<Algorithm>,
    /// Size of the object (the stored, possibly encoded, bytes).
    pub size: u64,
}

const PREFIX: &str = "chunks";

fn invalid(msg: String) -> ObjectError {
    ObjectError::Io(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

fn join_err(e: tokio::task::JoinError) -> ObjectError {
    ObjectError::Store(format!("a chunk task failed: {e}"))
}

/// Owner ids become a path segment: only `[A-Za-z0-9_-]{1,64}` may, so no
/// owner can name another's prefix (`..`, `/`) or a staging file (`#`).
fn check_owner(owner: &str) -> Result<()> {
    let ok = (1..=64).contains(&owner.len())
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{owner:?} is not an owner id (1 to 64 of A-Z a-z 0-9 _ -)"
        )))
    }
}

fn suffix(encoding: Option<Algorithm>) -> &'static str {
    match encoding {
        None => "",
        Some(Algorithm::Lz4) => ".lz4",
        Some(Algorithm::Zstd) => ".zst",
    }
}

/// The owner, hash and encoding a chunk key names; None for anything else.
fn parse_chunk_key(key: &str) -> Option<(String, ChunkHash, Option<Algorithm>)> {
    let mut parts = key.strip_prefix("chunks/")?.split('/');
    let (owner, fan, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || check_owner(owner).is_err() {
        return None;
    }
    let (hex, encoding) = match file.split_once('.') {
        None => (file, None),
        Some((h, "zst")) => (h, Some(Algorithm::Zstd)),
        Some((h, "lz4")) => (h, Some(Algorithm::Lz4)),
        Some(_) => return None,
    };
    let hash: ChunkHash = hex.parse().ok()?;
    (fan == &hex[..2]).then(|| (owner.to_string(), hash, encoding))
}

/// A staging name beside `dest`: `#` and digits only after it, so the
/// start-up sweep removes it and object_store's local listing skips it.
fn staging_path(dest: &Path) -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!("{name}#{}{n:010}", std::process::id()))
}

/// `raw` encoded as asked: a standard zstd frame (`zstd -d` reads it), or an
/// LZ4 block after a 4-byte little-endian raw size (the `lz4` crate's and
/// python-lz4's convention; not the `lz4` tool's frame format, whose setup
/// per chunk made reads slower, measured).
fn encode(raw: &[u8], encoding: Option<(Algorithm, i32)>) -> io::Result<Bytes> {
    match encoding {
        None => Ok(Bytes::copy_from_slice(raw)),
        Some((Algorithm::Zstd, level)) => {
            // One compression context per blocking thread, reused: making one
            // per chunk costs more than compressing 64 KiB at low levels.
            thread_local! {
                static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            ZSTD.with(|cell| {
                let mut cell = cell.borrow_mut();
                let compressor = match cell.as_mut() {
                    Some(c) => {
                        c.set_compression_level(level)?;
                        c
                    }
                    None => cell.insert(zstd::bulk::Compressor::new(level)?),
                };
                compressor.compress(raw).map(Bytes::from)
            })
        }
        Some((Algorithm::Lz4, level)) => {
            // As the LZ4 frame format counts levels: below 2 the fast
            // compressor, from 2 on the high-compression one at that level.
            let mode = match level {
                ..=1 => lz4::block::CompressionMode::DEFAULT,
                l => lz4::block::CompressionMode::HIGHCOMPRESSION(l),
            };
            lz4::block::compress(raw, Some(mode), true).map(Bytes::from)
        }
    }
}

/// The raw bytes of the stored chunk `stored` (read from `key`), verified:
/// its stored size, its decoding, then the raw length and BLAKE3 hash. Any
/// mismatch is `Corrupt`; nothing unverified leaves this function.
fn decode_verified(key: &str, chunk: &StoredChunk, stored: Bytes) -> Result<Bytes> {
    let corrupt = |expected: String, actual: String| ObjectError::Corrupt {
        key: key.to_string(),
        expected,
        actual,
    };
    if stored.len() as u64 != u64::from(chunk.stored_size) {
        return Err(corrupt(
            format!("{} stored bytes", chunk.stored_size),
            format!("{} stored bytes", stored.len()),
        ));
    }
    let limit = chunk.raw_size as usize;
    let raw = match chunk.encoding {
        None => Ok(stored),
        Some(Algorithm::Zstd) => {
            thread_local! {
                static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
                    const { std::cell::RefCell::new(None) };
            }
            ZSTD.with(|cell| {
                let mut cell = cell.borrow_mut();
                let d = match cell.as_mut() {
                    Some(d) => d,
                    None => cell.insert(zstd::bulk::Decompressor::new()?),
                };
                // At most the recorded size: a frame that says more is corrupt, not a reason to allocate.
                d.decompress(&stored, limit).map(Bytes::from)
            })
        }
        Some(Algorithm::Lz4) => {
            // The size prefix is checked against a buffer of the recorded
            // size: a corrupt prefix cannot make us allocate more.
            let mut out = vec![0u8; limit];
            lz4::block::decompress_to_buffer(&stored, None, &mut out).map(|n| {
                out.truncate(n);
                Bytes::from(out)
            })
        }
    };
    let raw = raw.map_err(|e: io::Error| {
        corrupt(
            format!("a {} frame", suffix(chunk.encoding).trim_start_matches('.')),
            format!("undecodable data ({e})"),
        )
    })?;
    let hash = ChunkHash::of(&raw);
    if raw.len() != limit || hash != chunk.hash {
        return Err(corrupt(
            format!("blake3 {} ({} bytes)", chunk.hash, chunk.raw_size),
            format!("blake3 {hash} ({} bytes)", raw.len()),
        ));
    }
    Ok(raw)
}

/// The SHA-256 of every block `blocks` delivers, in order (hex), on a
/// blocking thread of its own: it costs about as much as cutting, so the
/// two run side by side.
fn hash_stream(mut blocks: mpsc::Receiver<Bytes>) -> String {
    let mut sha = Sha256::new();
    while let Some(block) = blocks.blocking_recv() {
        sha.update(&block);
    }
    hex::encode(sha.finalize())
}

/// FastCDC cut points, on a blocking thread. Blocks arrive on `blocks`;
/// each batch of whole chunks goes out on `batches`. Returns the length of
/// the stream. Cut points are those of fastcdc's `StreamCDC` with the same sizes
/// (normalization level 1): a chunk is cut only once `max` bytes or the end
/// are in hand, so a block boundary never moves a cut.
fn cut_stream(
    mut blocks: mpsc::Receiver<Bytes>,
    batches: mpsc::Sender<Vec<Bytes>>,
    sizes: ChunkSizes,
) -> u64 {
    use fastcdc::v2020::{cut, select_masks, Normalization};
    let (min, avg, max) = (sizes.min as usize, sizes.avg as usize, sizes.max as usize);
    let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
    let mut total = 0u64;
    let mut pending = BytesMut::with_capacity(READ_BLOCK + max);
    let mut eof = false;
    while !eof {
        match blocks.blocking_recv() {
            Some(block) => {
                total += block.len() as u64;
                pending.extend_from_slice(&block);
            }
            None => eof = true,
        }
        let mut batch = vec![];
        while pending.len() >= max || (eof && !pending.is_empty()) {
            let (_, len) = cut(
                &pending,
                min,
                avg,
                max,
                mask_s,
                mask_l,
                mask_s << 1,
                mask_l << 1,
            );
            batch.push(pending.split_to(len).freeze());
        }
        if !batch.is_empty() && batches.blocking_send(batch).is_err() {
            // The consumer gave up (an error it reports itself).
            break;
        }
    }
    total
}

impl Objects {
    /// The key of a chunk: `chunks/{owner}/{first 2 hex}/{64 hex}[.lz4|.zst]`.
    pub fn chunk_key(owner: &str, hash: &ChunkHash, encoding: Option<Algorithm>) -> Result<String> {
        check_owner(owner)?;
        let hex = hash.to_string();
        Ok(format!(
            "{PREFIX}/{owner}/{}/{hex}{}",
            &hex[..2],
            suffix(encoding)
        ))
    }

    /// Splits `body` into content-defined chunks and uploads each chunk that
    /// `known` lacks and this call has not uploaded yet, raw (encoding None)
    /// or encoded with `encoding`. Returns the manifest. On error, chunks
    /// already uploaded stay (a sweep finds them), but no upload is still
    /// running: nothing is half-written under a chunk's final key, and a
    /// listing made after the error shows them all. Chunks are not durable
    /// on the local store until `sync_chunks`.
    pub async fn put_chunked(
        &self,
        owner: &str,
        body: impl AsyncRead + Unpin + Send,
        known: &(dyn Fn(&ChunkHash) -> bool + Sync),
        encoding: Option<(Algorithm, i32)>,
    ) -> Result<Chunked> {
        self.put_chunked_with(owner, body, known, encoding, ChunkSizes::DEFAULT)
            .await
    }

    /// `put_chunked` with other chunk sizes (for experiments).
    pub async fn put_chunked_with(
        &self,
        owner: &str,
        body: impl AsyncRead + Unpin + Send,
        known: &(dyn Fn(&ChunkHash) -> bool + Sync),
        encoding: Option<(Algorithm, i32)>,
        sizes: ChunkSizes,
    ) -> Result<Chunked> {
        let how = Cutting {
            sizes,
            encoding,
            whole_sha256: false,
        };
        self.chunk_stream(owner, body, known, how, ObjectError::Io)
            .await
    }

    /// The pipeline behind `put_chunked`: this task reads the body in
    /// `READ_BLOCK` blocks; one blocking thread cuts it (and, with
    /// `whole_sha256`, another hashes the whole stream, SHA-256); batches of chunks are BLAKE3-hashed on the
    /// blocking pool, two at once; back in stream order each chunk is
    /// recorded and, if new, handed to an upload task (encoding on the
    /// blocking pool), at most `CHUNKS_IN_FLIGHT` at once. Every queue is
    /// bounded.
    async fn chunk_stream(
        &self,
        owner: &str,
        mut body: impl AsyncRead + Unpin + Send,
        known: &(dyn Fn(&ChunkHash) -> bool + Sync),
        how: Cutting,
        on_read: impl Fn(io::Error) -> ObjectError,
    ) -> Result<Chunked> {
        let Cutting {
            sizes,
            encoding,
            whole_sha256,
        } = how;
        check_owner(owner)?;
        sizes.validate()?;
        let (block_tx, block_rx) = mpsc::channel::<Bytes>(BLOCKS_QUEUED);
        let (batch_tx, batch_rx) = mpsc::channel::<Vec<Bytes>>(BLOCKS_QUEUED);
        let cutter = tokio::task::spawn_blocking(move || cut_stream(block_rx, batch_tx, sizes));
        let (sha_tx, hasher) = if whole_sha256 {
            let (tx, rx) = mpsc::channel::<Bytes>(BLOCKS_QUEUED);
            (
                Some(tx),
                Some(tokio::task::spawn_blocking(move || hash_stream(rx))),
            )
        } else {
            (None, None)
        };

        let read = async move {
            loop {
                let mut block = BytesMut::with_capacity(READ_BLOCK);
                let mut eof = false;
                while block.len() < READ_BLOCK {
                    if body.read_buf(&mut block).await.map_err(&on_read)? == 0 {
                        eof = true;
                        break;
                    }
                }
                if !block.is_empty() {
                    // Both threads share the block. A closed channel means
                    // a thread stopped; its reason surfaces below.
                    let block = block.freeze();
                    if let Some(sha_tx) = &sha_tx {
                        if sha_tx.send(block.clone()).await.is_err() {
                            return Ok::<_, ObjectError>(());
                        }
                    }
                    if block_tx.send(block).await.is_err() {
                        return Ok(());
                    }
                }
                if eof {
                    return Ok(());
                }
            }
        };

        let hashed = tokio_stream::wrappers::ReceiverStream::new(batch_rx)
            .map(|batch| async {
                tokio::task::spawn_blocking(move || {
                    batch
                        .into_iter()
                        .map(|raw| (ChunkHash::of(&raw), raw))
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(join_err)
            })
            .buffered(BLOCKS_QUEUED);
        let store = self.store_hashed(owner, hashed, known, encoding);

        // Both sides run to their end even when one fails (a failed side
        // closes its channel, which ends the other), so no upload is still
        // writing when this returns: a caller that lists the store after an
        // error sees every chunk this call stored.
        let (read, stored) = tokio::join!(read, store);
        let (entries, new, raw_size) = stored?;
        read?;
        let total = cutter.await.map_err(join_err)?;
        let sha256 = match hasher {
            Some(hasher) => Some(hasher.await.map_err(join_err)?),
            None => None,
        };
        if total != raw_size {
            return Err(ObjectError::Store(format!(
                "chunking lost bytes: read {total}, chunked {raw_size}"
            )));
        }
        Ok(Chunked {
            entries,
            new,
            raw_size,
            sha256,
        })
    }

    /// Records each hashed chunk `hashed` yields in a manifest, in order,
    /// and hands each one `known` lacks and this call has not scheduled yet
    /// to an upload task (encoding on the blocking pool), at most
    /// `CHUNKS_IN_FLIGHT` at once. Returns the manifest, the chunks
    /// uploaded and the bytes seen. On error it first waits for the uploads
    /// still running: when it returns, nothing it started is still writing.
    async fn store_hashed(
        &self,
        owner: &str,
        mut hashed: impl futures_util::Stream<Item = Result<Hashed>> + Unpin + Send,
        known: &(dyn Fn(&ChunkHash) -> bool + Sync),
        encoding: Option<(Algorithm, i32)>,
    ) -> Result<(Vec<ChunkRef>, Vec<StoredChunk>, u64)> {
        let mut entries = vec![];
        let mut new = vec![];
        let mut raw_size = 0u64;
        let mut scheduled = HashSet::new();
        let mut uploads = tokio::task::JoinSet::new();
        let scheduling = async {
            while let Some(batch) = hashed.next().await {
                for (hash, raw) in batch? {
                    entries.push(ChunkRef {
                        hash,
                        raw_size: raw.len() as u32,
                    });
                    raw_size += raw.len() as u64;
                    if known(&hash) || !scheduled.insert(hash) {
                        continue;
                    }
                    while uploads.len() >= CHUNKS_IN_FLIGHT {
                        let done = uploads.join_next().await.expect("not empty");
                        new.push(done.map_err(join_err)??);
                    }
                    let key = Objects::chunk_key(owner, &hash, encoding.map(|e| e.0))?;
                    // A copy, so an upload holds its own chunk and not the
                    // whole read block the chunk is a slice of.
                    let raw = Bytes::copy_from_slice(&raw);
                    uploads.spawn(self.clone().store_chunk(key, hash, raw, encoding, false));
                }
            }
            while let Some(done) = uploads.join_next().await {
                new.push(done.map_err(join_err)??);
            }
            Ok::<_, ObjectError>(())
        }
        .await;
        if let Err(e) = scheduling {
            // Not aborted: an aborted task would leave its chunk file to be
            // written on the blocking pool after this returns. Each one ends
            // whole under its key or not at all.
            while uploads.join_next().await.is_some() {}
            return Err(e);
        }
        Ok((entries, new, raw_size))
    }

    /// Splits the file at `path` into `FILE_CHUNK` chunks at fixed offsets
    /// and uploads each one `known` lacks, raw, as `put_chunked` does.
    /// Segments are read (holes skipped) and hashed on the blocking pool,
    /// two at once. The file must not change meanwhile (a paused guest's).
    pub async fn put_file_chunked(
        &self,
        owner: &str,
        path: &Path,
        known: &(dyn Fn(&ChunkHash) -> bool + Sync),
    ) -> Result<Chunked> {
        check_owner(owner)?;
        let file = std::sync::Arc::new(tokio::fs::File::open(path).await?.into_std().await);
        let len = file.metadata()?.len();
        let segments = (0..len.div_ceil(FILE_SEGMENT)).map(move |i| {
            let start = i * FILE_SEGMENT;
            (start, FILE_SEGMENT.min(len - start))
        });
        let hashed = futures_util::stream::iter(segments)
            .map(move |(start, n)| {
                let file = file.clone();
                async move {
                    tokio::task::spawn_blocking(move || hash_segment(&file, start, n))
                        .await
                        .map_err(join_err)?
                        .map_err(ObjectError::Io)
                }
            })
            .buffered(SEGMENTS_QUEUED);
        let (entries, new, raw_size) = self.store_hashed(owner, hashed, known, None).await?;
        if raw_size != len {
            return Err(ObjectError::Store(format!(
                "chunking lost bytes of {}: {len} bytes, chunked {raw_size}",
                path.display()
            )));
        }
        Ok(Chunked {
            entries,
            new,
            raw_size,
            sha256: None,
        })
    }

    /// Encodes `raw` as asked and stores it under `key` (its chunk key).
    /// Locally: written to a staging name and renamed, so the key only ever
    /// holds a whole chunk; `durable` adds an fdatasync of the file before
    /// the rename and an fsync of the directory after it. S3: one PUT.
    async fn store_chunk(
        self,
        key: String,
        hash: ChunkHash,
        raw: Bytes,
        encoding: Option<(Algorithm, i32)>,
        durable: bool,
    ) -> Result<StoredChunk> {
        let raw_size = raw.len() as u32;
        let local = self.local_root.as_ref().map(|root| local_path(root, &key));
        // The local store's bytes are counted here; S3's by the counting store.
        let transfer = std::sync::Arc::clone(&self.transfer);
        let stored_size =
            tokio::task::spawn_blocking(move || -> io::Result<(u32, Option<Bytes>)> {
                let stored = encode(&raw, encoding)?;
                drop(raw);
                let Some(dest) = local else {
                    return Ok((stored.len() as u32, Some(stored)));
                };
                write_chunk_file(&dest, &stored, durable)?;
                transfer.add_up(stored.len() as u64);
                Ok((stored.len() as u32, None))
            })
            .await
            .map_err(join_err)??;
        let stored_size = match stored_size {
            (size, None) => size,
            (size, Some(bytes)) => {
                self.store
                    .put(&ObjPath::from(key.as_str()), PutPayload::from(bytes))
                    .await
                    .map_err(store_err)?;
                size
            }
        };
        Ok(StoredChunk {
            hash,
            raw_size,
            stored_size,
            encoding: encoding.map(|e| e.0),
        })
    }

    /// Chunks a read fetches ahead: the local store's files are read by the
    /// blocking pool, S3's by requests that mostly wait.
    fn fetch_window(&self) -> usize {
        if self.local_root.is_some() {
            CHUNKS_IN_FLIGHT
        } else {
            FETCHES_IN_FLIGHT_REMOTE
        }
    }

    /// Makes every chunk written so far durable: one `syncfs(2)` of the
    /// local store's file system (cheaper than an fsync per chunk). S3: a
    /// successful PUT is already durable, so nothing.
    pub async fn sync_chunks(&self) -> Result<()> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            let dir = std::fs::File::open(&root)?;
            // SAFETY: the fd is open for the duration of the call; syncfs only reads it.
            if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .await
        .map_err(join_err)?
        .map_err(ObjectError::Io)
    }

    /// The stored bytes of a chunk, from its file (one read, on the blocking
    /// pool) or one GET.
    async fn fetch_chunk(&self, key: String) -> Result<Bytes> {
        if let Some(root) = &self.local_root {
            let (path, transfer) = (
                local_path(root, &key),
                std::sync::Arc::clone(&self.transfer),
            );
            return tokio::task::spawn_blocking(move || read_local_chunk(&path, key, &transfer))
                .await
                .map_err(join_err)?;
        }
        let got = match self.store.get(&ObjPath::from(key.as_str())).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(ObjectError::Missing(key)),
            Err(e) => return Err(store_err(e)),
        };
        got.bytes().await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => ObjectError::Missing(key),
            e => store_err(e),
        })
    }

    /// A chunk's raw bytes, fetched and verified (`decode_verified`).
    async fn read_chunk(&self, owner: &str, chunk: StoredChunk) -> Result<Bytes> {
        let key = Objects::chunk_key(owner, &chunk.hash, chunk.encoding)?;
        let stored = self.fetch_chunk(key.clone()).await?;
        tokio::task::spawn_blocking(move || decode_verified(&key, &chunk, stored))
            .await
            .map_err(join_err)?
    }

    /// Writes the raw bytes of `chunks`, in order, into `out`, prefetching
    /// ahead and verifying each chunk before writing it: on error, `out` has
    /// received exactly the chunks before the failed one.
    pub async fn get_chunked(
        &self,
        owner: &str,
        chunks: &[StoredChunk],
        out: &mut (impl AsyncWrite + Unpin),
    ) -> Result<()> {
        check_owner(owner)?;
        // The closure owns what its futures use: one borrowing `self` makes
        // the whole future not `Send` for every lifetime, which spawned
        // callers need.
        let (objects, owner) = (self.clone(), owner.to_string());
        let mut fetched = futures_util::stream::iter(chunks.to_vec())
            .map(move |chunk| {
                let (objects, owner) = (objects.clone(), owner.clone());
                async move { objects.read_chunk(&owner, chunk).await }
            })
            .buffered(self.fetch_window());
        while let Some(raw) = fetched.next().await {
            out.write_all(&raw?).await?;
        }
        out.flush().await?;
        Ok(())
    }

    /// The same into a file: `dest` appears (rename of a `.partial` beside it)
    /// only once every chunk arrived intact; on error nothing is left. Chunks
    /// are fetched and written at their offsets in parallel, and a chunk of
    /// zeros is not written at all (the file is sized first), so runs of
    /// zeros stay holes.
    pub async fn get_chunked_file(
        &self,
        owner: &str,
        chunks: &[StoredChunk],
        dest: &Path,
    ) -> Result<()> {
        check_owner(owner)?;
        let tmp = partial_path(dest);
        let verdict = async {
            let file = tokio::fs::File::create(&tmp).await?.into_std().await;
            self.get_chunked_into(owner, chunks, std::sync::Arc::new(file))
                .await
        }
        .await;
        settle(&tmp, dest, verdict).await
    }

    /// `chunks`, in order, into `file` (sized to their total here; it must
    /// be empty, as a new memfd or file is), every chunk verified before it
    /// is written. Zeros are never written: they stay holes. On an error
    /// the file holds part of the data: the caller drops it.
    pub async fn get_chunked_into(
        &self,
        owner: &str,
        chunks: &[StoredChunk],
        file: std::sync::Arc<std::fs::File>,
    ) -> Result<()> {
        check_owner(owner)?;
        {
            let total: u64 = chunks.iter().map(|c| u64::from(c.raw_size)).sum();
            file.set_len(total)?;
            let mut offset = 0u64;
            let placed: Vec<(StoredChunk, u64)> = chunks
                .iter()
                .map(|c| {
                    let at = offset;
                    offset += u64::from(c.raw_size);
                    (*c, at)
                })
                .collect();
            let (objects, owner) = (self.clone(), owner.to_string());
            let mut written = futures_util::stream::iter(placed)
                .map(move |(chunk, at)| {
                    let (file, objects, owner) = (file.clone(), objects.clone(), owner.clone());
                    async move {
                        // A file chunk of zeros is what the hole already
                        // holds: nothing to fetch, and its hash says so.
                        if chunk.raw_size == FILE_CHUNK
                            && chunk.hash == zeros_hash(FILE_CHUNK as usize)
                        {
                            return Ok(());
                        }
                        use std::os::unix::fs::FileExt;
                        if let Some(root) = &objects.local_root {
                            // Local: read, verify and write in one trip to
                            // the blocking pool (three trips cost a third of
                            // a restore's time).
                            let key = Objects::chunk_key(&owner, &chunk.hash, chunk.encoding)?;
                            let path = local_path(root, &key);
                            let transfer = std::sync::Arc::clone(&objects.transfer);
                            return tokio::task::spawn_blocking(move || {
                                let stored = read_local_chunk(&path, key.clone(), &transfer)?;
                                let raw = decode_verified(&key, &chunk, stored)?;
                                if !is_zeros(&raw) {
                                    file.write_all_at(&raw, at)?;
                                }
                                Ok(())
                            })
                            .await
                            .map_err(join_err)?;
                        }
                        let raw = objects.read_chunk(&owner, chunk).await?;
                        tokio::task::spawn_blocking(move || {
                            if is_zeros(&raw) {
                                return Ok(());
                            }
                            file.write_all_at(&raw, at)
                        })
                        .await
                        .map_err(join_err)?
                        .map_err(ObjectError::Io)
                    }
                })
                .buffer_unordered(self.fetch_window());
            while let Some(done) = written.next().await {
                done?;
            }
            Ok(())
        }
    }

    /// Stores `chunk` again encoded with `to` (read, decoded, verified,
    /// re-encoded, written under the new key, durable when this returns).
    /// The old object stays: the caller deletes it once the new one is
    /// recorded. `to` must be another encoding than the chunk's: the same
    /// one would be the same key, which the caller would then delete.
    pub async fn recode_chunk(
        &self,
        owner: &str,
        chunk: &StoredChunk,
        to: (Algorithm, i32),
    ) -> Result<StoredChunk> {
        if chunk.encoding == Some(to.0) {
            return Err(invalid(format!(
                "chunk {} is already stored as {}",
                chunk.hash, to.0
            )));
        }
        let raw = self.read_chunk(owner, *chunk).await?;
        let key = Objects::chunk_key(owner, &chunk.hash, Some(to.0))?;
        self.clone()
            .store_chunk(key, chunk.hash, raw, Some(to), true)
            .await
    }

    /// Deletes one chunk object; a missing one is not an error (a retried delete succeeds).
    pub async fn delete_chunk(
        &self,
        owner: &str,
        hash: &ChunkHash,
        encoding: Option<Algorithm>,
    ) -> Result<()> {
        self.delete(&Objects::chunk_key(owner, hash, encoding)?)
            .await
    }

    /// Every chunk object of `owner` (None: of every owner). Keys under
    /// `chunks/` that do not parse are skipped with a warning.
    pub async fn list_chunks(&self, owner: Option<&str>) -> Result<Vec<ListedChunk>> {
        let prefix = match owner {
            Some(o) => {
                check_owner(o)?;
                format!("{PREFIX}/{o}")
            }
            None => PREFIX.to_string(),
        };
        let mut out = vec![];
        let mut items = self.store.list(Some(&ObjPath::from(prefix)));
        while let Some(meta) = items.next().await {
            let meta = meta.map_err(store_err)?;
            let key = meta.location.to_string();
            match parse_chunk_key(&key) {
                Some((owner, hash, encoding)) => out.push(ListedChunk {
                    owner,
                    hash,
                    encoding,
                    size: meta.size,
                }),
                None => tracing::warn!(key, "not a chunk key; left alone"),
            }
        }
        out.sort_by(|a, b| (&a.owner, a.hash).cmp(&(&b.owner, b.hash)));
        Ok(out)
    }

    /// Chunks a whole object already in the store (a snapshot in the
    /// previous format): streams `key`, decompressing with `decompress` when
    /// given, through `put_chunked` (new chunks stored raw); at the end
    /// checks the object against `expected` (and the raw bytes against the
    /// decompress checksum), as `stream_to` does. A mismatch is `Corrupt`.
    pub async fn chunk_object(
        &self,
        key: &str,
        expected: &Stored,
        decompress: Option<(Algorithm, &Stored)>,
        owner: &str,
        known: &(dyn Fn(&ChunkHash) -> bool + Sync),
    ) -> Result<Chunked> {
        check_owner(owner)?;
        let mut body = Tallied::new(self.open(key).await?);
        let Some((algorithm, raw)) = decompress else {
            let chunked = self
                .chunk_stream(owner, &mut body, known, Cutting::converting(false), |e| {
                    read_err(key, e)
                })
                .await?;
            check(key, "", expected, &body.tally())?;
            return Ok(chunked);
        };
        let decoder = algorithm.decoder(BufReader::with_capacity(COPY_BUF, &mut body));
        let chunked = self
            .chunk_stream(owner, decoder, known, Cutting::converting(true), |e| {
                match read_err(key, e) {
                    // Not from the store, so from the decoder: the bytes are not a valid stream.
                    ObjectError::Io(e) => ObjectError::Corrupt {
                        key: key.to_string(),
                        expected: format!("a {algorithm} stream, {}", describe_stored(expected)),
                        actual: format!("undecodable data ({e})"),
                    },
                    other => other,
                }
            })
            .await?;
        // The decoder stops at the end of its frame; anything after it still counts.
        tokio::io::copy(&mut body, &mut tokio::io::sink())
            .await
            .map_err(|e| read_err(key, e))?;
        let decoded = Stored {
            size: chunked.raw_size,
            sha256: chunked.sha256.clone().unwrap_or_default(),
        };
        check(key, "compressed ", expected, &body.tally())?;
        check(key, "uncompressed ", raw, &decoded)?;
        Ok(chunked)
    }
}

/// The stored bytes of the local chunk file `path` (key `key`), read whole
/// and counted; a missing file is `Missing`. Blocking.
fn read_local_chunk(path: &Path, key: String, transfer: &super::Transfer) -> Result<Bytes> {
    match std::fs::read(path) {
        Ok(bytes) => {
            transfer.add_down(bytes.len() as u64);
            Ok(Bytes::from(bytes))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ObjectError::Missing(key)),
        Err(e) => Err(e.into()),
    }
}

/// True when every byte is 0. The slice equals itself shifted by one byte
/// only if all its bytes are equal: one `memcmp`, fast in any build.
fn is_zeros(raw: &[u8]) -> bool {
    match raw.split_first() {
        None => true,
        Some((&first, rest)) => first == 0 && rest == &raw[..raw.len() - 1],
    }
}

/// Writes `bytes` to `dest` through a staging file beside it and a rename.
/// Creates the fan-out directory the first time it is missing.
fn write_chunk_file(dest: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    use std::io::Write;
    let staging = staging_path(dest);
    let mut file = match std::fs::File::create(&staging) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))?;
            std::fs::File::create(&staging)?
        }
        other => other?,
    };
    let written = (|| {
        file.write_all(bytes)?;
        if durable {
            file.sync_data()?;
        } else {
            use std::os::fd::AsRawFd;
            // Writeback starts now, while the capture goes on, so the
            // `sync_chunks` that ends it waits for less. A hint: its
            // failure changes nothing (`sync_chunks` still flushes).
            // SAFETY: the fd is open for the duration of the call.
            unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        drop(file);
        std::fs::rename(&staging, dest)?;
        if durable {
            if let Some(dir) = dest.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testing::{S3sFs, TempDir};
    use std::collections::HashMap;
    use std::path::PathBuf;

    const SIZES: ChunkSizes = ChunkSizes::DEFAULT;

    /// Incompressible bytes, the same for the same seed (xorshift64).
    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// About 6.5 MiB like a guest's memory: random pages, a run of zeros
    /// (identical chunks inside one stream), text (compressible), and a
    /// second copy of an earlier random region (repeated content).
    fn mixed_stream() -> Vec<u8> {
        let mut data = random(1, (2 << 20) + 12345);
        let earlier = data[256 << 10..(256 << 10) + (3 << 19)].to_vec();
        data.extend(std::iter::repeat_n(0u8, 1 << 20));
        let mut text = String::new();
        for i in 0.. {
            if text.len() >= 1 << 20 {
                break;
            }
            text.push_str(&format!(
                "line {i}: the guest kernel wrote this page of text\n"
            ));
        }
        data.extend_from_slice(text.as_bytes());
        data.extend(random(2, 1 << 20));
        data.extend(earlier);
        data.extend(random(3, 777));
        data
    }

    /// The chunk lengths fastcdc's own whole-buffer chunker finds, with their hashes.
    fn reference_chunks(data: &[u8]) -> Vec<(ChunkHash, usize)> {
        fastcdc::v2020::FastCDC::new(
            data,
            SIZES.min as usize,
            SIZES.avg as usize,
            SIZES.max as usize,
        )
        .map(|c| {
            (
                ChunkHash::of(&data[c.offset..c.offset + c.length]),
                c.length,
            )
        })
        .collect()
    }

    fn manifest(
        entries: &[ChunkRef],
        stored: &HashMap<ChunkHash, StoredChunk>,
    ) -> Vec<StoredChunk> {
        entries.iter().map(|e| stored[&e.hash]).collect()
    }

    fn record(map: &mut HashMap<ChunkHash, StoredChunk>, new: &[StoredChunk]) {
        for c in new {
            map.insert(c.hash, *c);
        }
    }

    async fn object_count(objects: &Objects) -> usize {
        objects.list("chunks/").await.unwrap().len()
    }

    /// What `get_chunked` wrote before it returned, and its verdict.
    async fn read_back(
        objects: &Objects,
        owner: &str,
        chunks: &[StoredChunk],
    ) -> (Vec<u8>, Result<()>) {
        let mut out = vec![];
        let verdict = objects.get_chunked(owner, chunks, &mut out).await;
        (out, verdict)
    }

    async fn read_file_back(
        objects: &Objects,
        owner: &str,
        chunks: &[StoredChunk],
        dest: &Path,
    ) -> Result<Vec<u8>> {
        objects.get_chunked_file(owner, chunks, dest).await?;
        assert!(!partial_path(dest).exists());
        Ok(std::fs::read(dest).unwrap())
    }

    fn flip_byte(file: &Path, at: usize) {
        let mut bytes = std::fs::read(file).unwrap();
        bytes[at] ^= 0x40;
        std::fs::write(file, bytes).unwrap();
    }

    fn assert_corrupt(e: &ObjectError, key: &str) {
        assert!(
            matches!(e, ObjectError::Corrupt { key: k, .. } if k == key),
            "expected Corrupt naming {key}, got {e}"
        );
    }

    fn assert_refused(e: &ObjectError) {
        assert!(
            matches!(e, ObjectError::Io(io) if io.kind() == io::ErrorKind::InvalidInput),
            "{e}"
        );
    }

    /// The checks every store must pass. `backing` names the file that holds
    /// a key's bytes, so corruption can be injected under the store's feet.
    async fn check_chunks(objects: &Objects, backing: &dyn Fn(&str) -> PathBuf, scratch: &Path) {
        let owner = "own_aaaaaaaaaaaa";
        let data = mixed_stream();
        let nothing = |_: &ChunkHash| false;
        assert_eq!(object_count(objects).await, 0);
        assert_eq!(objects.list_chunks(None).await.unwrap(), vec![]);

        // Round trip, cut exactly where fastcdc cuts the whole buffer.
        let first = objects
            .put_chunked(owner, &data[..], &nothing, None)
            .await
            .unwrap();
        objects.sync_chunks().await.unwrap();
        let reference = reference_chunks(&data);
        let got: Vec<_> = first
            .entries
            .iter()
            .map(|e| (e.hash, e.raw_size as usize))
            .collect();
        assert_eq!(got, reference);
        assert_eq!(
            first
                .entries
                .iter()
                .map(|e| u64::from(e.raw_size))
                .sum::<u64>(),
            data.len() as u64
        );
        assert_eq!(first.raw_size, data.len() as u64);
        // No whole-stream checksum for a capture: each chunk has its own.
        assert_eq!(first.sha256, None);
        // A chunk repeated inside the stream is uploaded once.
        let distinct: HashSet<_> = first.entries.iter().map(|e| e.hash).collect();
        assert!(
            distinct.len() < first.entries.len(),
            "the stream repeats chunks"
        );
        let uploaded: HashSet<_> = first.new.iter().map(|c| c.hash).collect();
        assert_eq!(uploaded, distinct);
        assert_eq!(first.new.len(), distinct.len());
        assert_eq!(object_count(objects).await, distinct.len());
        for c in &first.new {
            assert_eq!((c.encoding, c.stored_size), (None, c.raw_size));
            let key = Objects::chunk_key(owner, &c.hash, None).unwrap();
            assert_eq!(
                std::fs::metadata(backing(&key)).unwrap().len(),
                u64::from(c.raw_size)
            );
        }
        let mut stored = HashMap::new();
        record(&mut stored, &first.new);
        let chunks = manifest(&first.entries, &stored);
        let (back, verdict) = read_back(objects, owner, &chunks).await;
        verdict.unwrap();
        assert!(back == data);
        let dest = scratch.join("memory");
        assert!(
            read_file_back(objects, owner, &chunks, &dest)
                .await
                .unwrap()
                == data
        );

        // The same stream again, with the first's chunks known: nothing uploaded.
        let again = objects
            .put_chunked(owner, &data[..], &|h| distinct.contains(h), None)
            .await
            .unwrap();
        assert_eq!(again.entries, first.entries);
        assert_eq!(again.new, vec![]);
        assert_eq!(object_count(objects).await, distinct.len());

        // A few bytes changed in the middle, and so a shift of everything
        // after them: only the chunks around the change are new.
        let mut changed = data.clone();
        let middle = (4 << 20) + 500_000;
        changed.splice(middle..middle + 3, *b"eight by");
        let edited = objects
            .put_chunked(owner, &changed[..], &|h| stored.contains_key(h), None)
            .await
            .unwrap();
        let expected_new: HashSet<_> = reference_chunks(&changed)
            .into_iter()
            .map(|(h, _)| h)
            .filter(|h| !stored.contains_key(h))
            .collect();
        // The chunk holding the change, and at most the next before the cut points meet again.
        let new_bytes: u64 = edited.new.iter().map(|c| u64::from(c.raw_size)).sum();
        assert!(
            !edited.new.is_empty() && new_bytes <= 2 * u64::from(SIZES.max),
            "{} chunks, {new_bytes} bytes uploaded for 3 bytes replaced by 8",
            edited.new.len()
        );
        let uploaded: HashSet<_> = edited.new.iter().map(|c| c.hash).collect();
        assert_eq!(uploaded, expected_new);
        assert_eq!(
            object_count(objects).await,
            distinct.len() + edited.new.len()
        );
        record(&mut stored, &edited.new);
        let (back, verdict) = read_back(objects, owner, &manifest(&edited.entries, &stored)).await;
        verdict.unwrap();
        assert!(back == changed);

        // Encoded chunks: smaller when the data compresses, read back exact,
        // and standard frames the usual tools decode.
        for (algorithm, level, enc_owner) in [
            (Algorithm::Zstd, 3, "own_zstdzstdzstd"),
            (Algorithm::Lz4, 0, "own_lz4lz4lz4lz4"),
        ] {
            let encoded = objects
                .put_chunked(enc_owner, &data[..], &nothing, Some((algorithm, level)))
                .await
                .unwrap();
            assert_eq!(encoded.entries, first.entries);
            let mut enc_stored = HashMap::new();
            record(&mut enc_stored, &encoded.new);
            let (mut raw_total, mut stored_total) = (0u64, 0u64);
            for c in &encoded.new {
                assert_eq!(c.encoding, Some(algorithm));
                let key = Objects::chunk_key(enc_owner, &c.hash, c.encoding).unwrap();
                let bytes = std::fs::read(backing(&key)).unwrap();
                assert_eq!(bytes.len() as u64, u64::from(c.stored_size), "{key}");
                let raw = match algorithm {
                    Algorithm::Zstd => zstd::decode_all(&bytes[..]).unwrap(),
                    Algorithm::Lz4 => lz4::block::decompress(&bytes, None).unwrap(),
                };
                assert_eq!(ChunkHash::of(&raw), c.hash);
                raw_total += u64::from(c.raw_size);
                stored_total += u64::from(c.stored_size);
            }
            // The zero chunk and the text chunks shrink a lot; random ones barely grow.
            let zeros = encoded
                .new
                .iter()
                .find(|c| c.hash == ChunkHash::of(&vec![0u8; c.raw_size as usize]))
                .expect("a chunk of zeros");
            assert!(
                zeros.stored_size < zeros.raw_size / 100,
                "{algorithm}: {zeros:?}"
            );
            assert!(
                stored_total < raw_total * 3 / 4,
                "{algorithm}: {stored_total} of {raw_total}"
            );
            let chunks = manifest(&encoded.entries, &enc_stored);
            let (back, verdict) = read_back(objects, enc_owner, &chunks).await;
            verdict.unwrap();
            assert!(back == data, "{algorithm}");
            let dest = scratch.join(format!("memory.{algorithm}"));
            assert!(
                read_file_back(objects, enc_owner, &chunks, &dest)
                    .await
                    .unwrap()
                    == data
            );
        }

        // Recoding raw -> zstd: a new object beside the old, read back exact.
        let text_chunk = first
            .entries
            .iter()
            .map(|e| stored[&e.hash])
            .find(|c| {
                let key = Objects::chunk_key(owner, &c.hash, None).unwrap();
                let bytes = std::fs::read(backing(&key)).unwrap();
                bytes
                    .iter()
                    .all(|b| b.is_ascii_graphic() || b" \n".contains(b))
            })
            .expect("a text chunk");
        let recoded = objects
            .recode_chunk(owner, &text_chunk, (Algorithm::Zstd, 5))
            .await
            .unwrap();
        assert_eq!(recoded.encoding, Some(Algorithm::Zstd));
        assert_eq!(
            (recoded.hash, recoded.raw_size),
            (text_chunk.hash, text_chunk.raw_size)
        );
        assert!(recoded.stored_size < text_chunk.raw_size / 2, "{recoded:?}");
        let old_key = Objects::chunk_key(owner, &text_chunk.hash, None).unwrap();
        let new_key = Objects::chunk_key(owner, &text_chunk.hash, Some(Algorithm::Zstd)).unwrap();
        assert!(backing(&old_key).exists() && backing(&new_key).exists());
        let e = objects
            .recode_chunk(owner, &recoded, (Algorithm::Zstd, 1))
            .await
            .unwrap_err();
        assert_refused(&e);
        objects
            .delete_chunk(owner, &text_chunk.hash, None)
            .await
            .unwrap();
        stored.insert(recoded.hash, recoded);
        let chunks = manifest(&first.entries, &stored);
        let (back, verdict) = read_back(objects, owner, &chunks).await;
        verdict.unwrap();
        assert!(back == data);

        // A flipped byte, in a raw chunk and in a compressed one: Corrupt
        // naming the chunk, nothing of it written, no file left.
        let victim = first.entries.len() / 2;
        let raw_victim = chunks[victim];
        assert_eq!(raw_victim.encoding, None);
        let zst_victim = recoded;
        for (victim_chunk, at) in [
            (raw_victim, 1000),
            (zst_victim, zst_victim.stored_size as usize / 2),
        ] {
            let key = Objects::chunk_key(owner, &victim_chunk.hash, victim_chunk.encoding).unwrap();
            let original = std::fs::read(backing(&key)).unwrap();
            flip_byte(&backing(&key), at);
            let first_use = chunks
                .iter()
                .position(|c| c.hash == victim_chunk.hash)
                .unwrap();
            let before: usize = chunks[..first_use]
                .iter()
                .map(|c| c.raw_size as usize)
                .sum();
            let (back, verdict) = read_back(objects, owner, &chunks).await;
            assert_corrupt(&verdict.unwrap_err(), &key);
            assert!(
                back == data[..before],
                "wrote {} bytes, {before} verified",
                back.len()
            );
            let dest = scratch.join("corrupt");
            let e = objects
                .get_chunked_file(owner, &chunks, &dest)
                .await
                .unwrap_err();
            assert_corrupt(&e, &key);
            assert!(!dest.exists() && !partial_path(&dest).exists());
            std::fs::write(backing(&key), original).unwrap();
        }

        // A deleted chunk is Missing; deleting it again is fine.
        let gone = chunks[victim];
        let gone_key = Objects::chunk_key(owner, &gone.hash, gone.encoding).unwrap();
        objects
            .delete_chunk(owner, &gone.hash, gone.encoding)
            .await
            .unwrap();
        objects
            .delete_chunk(owner, &gone.hash, gone.encoding)
            .await
            .unwrap();
        let (_, verdict) = read_back(objects, owner, &chunks).await;
        let e = verdict.unwrap_err();
        assert!(
            matches!(&e, ObjectError::Missing(k) if *k == gone_key),
            "{e}"
        );
        let dest = scratch.join("missing");
        let e = objects
            .get_chunked_file(owner, &chunks, &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ObjectError::Missing(k) if *k == gone_key),
            "{e}"
        );
        assert!(!dest.exists() && !partial_path(&dest).exists());
        stored.remove(&gone.hash);

        // Listing: exactly each owner's objects, never a neighbour's whose id
        // extends it, and a stray key under chunks/ skipped.
        let small = random(9, 100_000);
        let a = objects
            .put_chunked("own_a", &small[..], &nothing, None)
            .await
            .unwrap();
        let ab = objects
            .put_chunked("own_ab", &small[..], &nothing, Some((Algorithm::Lz4, 1)))
            .await
            .unwrap();
        objects
            .store
            .put(
                &ObjPath::from("chunks/own_a/zz/not-a-chunk"),
                PutPayload::from_static(b"x"),
            )
            .await
            .unwrap();
        let listed = |owner: &str, new: &[StoredChunk]| {
            let mut l: Vec<ListedChunk> = new
                .iter()
                .map(|c| ListedChunk {
                    owner: owner.to_string(),
                    hash: c.hash,
                    encoding: c.encoding,
                    size: u64::from(c.stored_size),
                })
                .collect();
            l.sort_by(|a, b| (&a.owner, a.hash).cmp(&(&b.owner, b.hash)));
            l
        };
        assert_eq!(
            objects.list_chunks(Some("own_a")).await.unwrap(),
            listed("own_a", &a.new)
        );
        assert_eq!(
            objects.list_chunks(Some("own_ab")).await.unwrap(),
            listed("own_ab", &ab.new)
        );
        let mine: Vec<StoredChunk> = stored.values().copied().collect();
        assert_eq!(
            objects.list_chunks(Some(owner)).await.unwrap(),
            listed(owner, &mine)
        );
        let all = objects.list_chunks(None).await.unwrap();
        for o in [
            owner,
            "own_a",
            "own_ab",
            "own_zstdzstdzstd",
            "own_lz4lz4lz4lz4",
        ] {
            assert_eq!(
                all.iter()
                    .filter(|c| c.owner == o)
                    .cloned()
                    .collect::<Vec<_>>(),
                objects.list_chunks(Some(o)).await.unwrap()
            );
        }
        assert_eq!(all.len() + 1, object_count(objects).await);

        // Owner ids that could name another prefix are refused before anything is touched.
        let count = object_count(objects).await;
        let too_long = "o".repeat(65);
        for bad in [
            "",
            "own/a",
            "..",
            "../own_a",
            "own_a/..",
            "own a",
            "own#1",
            too_long.as_str(),
        ] {
            assert_refused(&Objects::chunk_key(bad, &gone.hash, None).unwrap_err());
            assert_refused(
                &objects
                    .put_chunked(bad, &small[..], &nothing, None)
                    .await
                    .unwrap_err(),
            );
            assert_refused(&objects.list_chunks(Some(bad)).await.unwrap_err());
            assert_refused(&read_back(objects, bad, &chunks[..1]).await.1.unwrap_err());
            assert_refused(
                &objects
                    .delete_chunk(bad, &gone.hash, None)
                    .await
                    .unwrap_err(),
            );
        }
        assert_eq!(object_count(objects).await, count);
    }

    #[tokio::test]
    async fn local_chunk_store_round_trips_dedups_and_verifies() {
        let dir = TempDir::new("chunks-local");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        check_chunks(&objects, &|k| root.join(k), dir.path()).await;
        // No staging file stays behind; one a crash left is invisible to
        // list_chunks and removed by the start-up sweep.
        assert_eq!(objects.remove_unfinished_uploads().await.unwrap(), 0);
        let listed = objects.list_chunks(None).await.unwrap();
        let key = Objects::chunk_key("own_a", &ChunkHash::of(b"lost"), None).unwrap();
        let staged = staging_path(&root.join(key));
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, b"half a chunk").unwrap();
        assert_eq!(objects.list_chunks(None).await.unwrap(), listed);
        assert_eq!(objects.remove_unfinished_uploads().await.unwrap(), 1);
        assert!(!staged.exists());
    }

    #[tokio::test]
    async fn s3_chunk_store_round_trips_dedups_and_verifies() {
        let s3 = S3sFs::start();
        let objects = Objects::s3(&s3.config()).unwrap();
        check_chunks(&objects, &|k| s3.object_file(k), &s3.scratch()).await;
    }

    #[test]
    fn chunk_hashes_are_64_lowercase_hex() {
        let h = ChunkHash::of(b"hello");
        let text = h.to_string();
        assert_eq!(text, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(text.parse::<ChunkHash>().unwrap(), h);
        for bad in [
            text.to_uppercase(),
            text[1..].to_string(),
            format!("{text}0"),
            "g".repeat(64),
        ] {
            assert!(bad.parse::<ChunkHash>().is_err(), "{bad}");
        }
    }

    #[test]
    fn chunk_keys_parse_back_and_nothing_else_does() {
        let h = ChunkHash::of(b"x");
        for encoding in [None, Some(Algorithm::Zstd), Some(Algorithm::Lz4)] {
            let key = Objects::chunk_key("own_123456789012", &h, encoding).unwrap();
            assert!(key.starts_with(&format!(
                "chunks/own_123456789012/{}/{h}",
                &h.to_string()[..2]
            )));
            assert_eq!(
                parse_chunk_key(&key),
                Some(("own_123456789012".to_string(), h, encoding))
            );
        }
        let hex = h.to_string();
        for bad in [
            format!("chunks/own_a/00/{hex}"), // wrong fan-out directory
            format!("chunks/own_a/{}/{hex}.zstd", &hex[..2]), // not our suffix
            format!("chunks/own_a/{}/{hex}.zst#1", &hex[..2]),
            format!("chunks/own a/{}/{hex}", &hex[..2]),
            format!("chunks/own_a/x/{}/{hex}", &hex[..2]),
            format!("snapshots/own_a/{}/{hex}", &hex[..2]),
        ] {
            assert_eq!(parse_chunk_key(&bad), None, "{bad}");
        }
    }

    #[test]
    fn chunk_sizes_outside_fastcdc_limits_are_refused() {
        ChunkSizes::DEFAULT.validate().unwrap();
        for bad in [
            ChunkSizes {
                min: 32,
                avg: 256,
                max: 1024,
            },
            ChunkSizes {
                min: 4096,
                avg: 1024,
                max: 8192,
            },
            ChunkSizes {
                min: 1024,
                avg: 4096,
                max: 2048,
            },
            ChunkSizes {
                min: 1025,
                avg: 4096,
                max: 8192,
            },
            ChunkSizes {
                min: 1024,
                avg: 4096,
                max: 32 << 20,
            },
        ] {
            assert_refused(&bad.validate().unwrap_err());
        }
    }

    /// Small chunks, so many cut points fall across the reader's 1 MiB
    /// blocks, and a body that hands out a few KiB per read: still exactly
    /// fastcdc's cut points for the whole buffer.
    #[tokio::test]
    async fn cut_points_do_not_depend_on_how_the_stream_arrives() {
        let dir = TempDir::new("chunks-sizes");
        let objects = Objects::local(&dir.path().join("store")).unwrap();
        let sizes = ChunkSizes {
            min: 1024,
            avg: 4096,
            max: 16384,
        };
        let data = [random(5, 3 << 20), vec![0; 100_000], random(6, 1234)].concat();
        let (client, mut server) = tokio::io::duplex(4096);
        let feed = {
            let data = data.clone();
            tokio::spawn(async move {
                for piece in data.chunks(3000) {
                    server.write_all(piece).await.unwrap();
                }
            })
        };
        let chunked = objects
            .put_chunked_with("own_s", client, &|_| false, None, sizes)
            .await
            .unwrap();
        feed.await.unwrap();
        let reference: Vec<usize> = fastcdc::v2020::FastCDC::new(&data, 1024, 4096, 16384)
            .map(|c| c.length)
            .collect();
        let got: Vec<usize> = chunked
            .entries
            .iter()
            .map(|e| e.raw_size as usize)
            .collect();
        assert_eq!(got, reference);
        assert!(got.len() > 300, "{} chunks", got.len());
        // An empty stream is an empty manifest, and reads back as nothing.
        let empty = objects
            .put_chunked("own_s", &b""[..], &|_| false, None)
            .await
            .unwrap();
        assert_eq!((empty.entries.len(), empty.raw_size), (0, 0));
        let dest = dir.path().join("empty");
        assert_eq!(
            read_file_back(&objects, "own_s", &[], &dest).await.unwrap(),
            b""
        );
    }

    /// Whole objects of the previous format become chunks: the same cut
    /// points as `put_chunked` of their raw bytes, checked against their
    /// recorded sums.
    #[tokio::test]
    async fn whole_objects_are_chunked_and_checked() {
        let dir = TempDir::new("chunks-convert");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        let data = mixed_stream();
        let src = dir.path().join("memory");
        std::fs::write(&src, &data).unwrap();
        let raw_key = crate::snapshot::key("vm_a", "snap_a", "memory");
        let raw = objects.put_file(&raw_key, &src).await.unwrap();
        let zst_key = format!("{raw_key}.zstd");
        let zst = objects
            .compress(&raw_key, &zst_key, Algorithm::Zstd, 3)
            .await
            .unwrap();
        let direct = objects
            .put_chunked("own_c", &data[..], &|_| false, None)
            .await
            .unwrap();

        let from_raw = objects
            .chunk_object(&raw_key, &raw, None, "own_c", &|_| false)
            .await
            .unwrap();
        assert_eq!(
            (&from_raw.entries, &from_raw.raw_size),
            (&direct.entries, &direct.raw_size)
        );
        let from_zst = objects
            .chunk_object(
                &zst_key,
                &zst,
                Some((Algorithm::Zstd, &raw)),
                "own_c",
                &|_| true,
            )
            .await
            .unwrap();
        assert_eq!(
            (&from_zst.entries, from_zst.new.len()),
            (&direct.entries, 0)
        );

        // Recorded sums that do not match are Corrupt, for either end.
        let wrong = Stored {
            size: raw.size,
            sha256: zst.sha256.clone(),
        };
        for (stored, decompress) in [
            (&wrong, None),
            (&wrong, Some((Algorithm::Zstd, &raw))),
            (&zst, Some((Algorithm::Zstd, &wrong))),
        ] {
            let key = if decompress.is_some() {
                &zst_key
            } else {
                &raw_key
            };
            let e = objects
                .chunk_object(key, stored, decompress, "own_c", &|_| true)
                .await
                .unwrap_err();
            assert_corrupt(&e, key);
        }
        // A compressed object the decoder rejects is Corrupt too.
        flip_byte(&root.join(&zst_key), 100);
        let e = objects
            .chunk_object(
                &zst_key,
                &zst,
                Some((Algorithm::Zstd, &raw)),
                "own_c",
                &|_| true,
            )
            .await
            .unwrap_err();
        assert_corrupt(&e, &zst_key);
        let e = objects
            .chunk_object("snapshots/none", &raw, None, "own_c", &|_| true)
            .await
            .unwrap_err();
        assert!(matches!(e, ObjectError::Missing(_)), "{e}");
    }

    /// Bytes made on the fly, never held: a stream as large as a guest's
    /// memory with nothing behind it.
    struct Generated {
        left: u64,
        x: u64,
    }

    impl AsyncRead for Generated {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let n = (buf.remaining() as u64).min(self.left).min(64 << 10) as usize & !7;
            let n = if n == 0 {
                (self.left as usize).min(buf.remaining())
            } else {
                n
            };
            let mut piece = Vec::with_capacity(n + 8);
            while piece.len() < n {
                self.x ^= self.x << 13;
                self.x ^= self.x >> 7;
                self.x ^= self.x << 17;
                piece.extend_from_slice(&self.x.to_le_bytes());
            }
            buf.put_slice(&piece[..n]);
            self.left -= n as u64;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn peak_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            << 10
    }

    const MEMORY_CHILD: &str = "HATCH_TEST_CHUNKS_MEMORY_CHILD";

    /// put_chunked of a 256 MiB stream (all new, incompressible: every chunk
    /// uploaded) raises the process's peak RSS by well under the stream's
    /// size. Run in a process of its own, since VmHWM is per process and
    /// `cargo test` runs other tests in threads of this one.
    #[test]
    fn put_chunked_memory_stays_bounded() {
        const STREAM: u64 = 256 << 20;
        // The pipeline holds a few MiB of read blocks and batches plus
        // CHUNKS_IN_FLIGHT chunks (raw and encoded, 8 MiB at most):
        // about 20 MiB. Allow three times that; holding the stream would
        // cost 256 MiB.
        const BOUND: u64 = 64 << 20;
        if std::env::var_os(MEMORY_CHILD).is_none() {
            let name = "snapshot::chunks::tests::put_chunked_memory_stays_bounded";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(MEMORY_CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            println!("{stdout}{stderr}");
            assert!(out.status.success(), "the measuring process failed");
            // Not a filter that matched nothing.
            assert!(
                stdout.contains("1 passed"),
                "the measuring process ran no test"
            );
            return;
        }
        let dir = TempDir::new("chunks-memory");
        let objects = Objects::local(&dir.path().join("store")).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let before = peak_rss();
        let body = Generated {
            left: STREAM,
            x: 0x2545_f491_4f6c_dd1d,
        };
        let chunked = runtime
            .block_on(objects.put_chunked("own_m", body, &|_| false, Some((Algorithm::Lz4, 0))))
            .unwrap();
        let grown = peak_rss().saturating_sub(before);
        println!(
            "put_chunked of {} MiB in {} chunks ({} new): peak RSS grew by {:.1} MiB (bound {} MiB)",
            STREAM >> 20,
            chunked.entries.len(),
            chunked.new.len(),
            grown as f64 / (1 << 20) as f64,
            BOUND >> 20
        );
        assert_eq!(chunked.raw_size, STREAM);
        assert_eq!(chunked.new.len(), chunked.entries.len());
        assert!(
            grown < BOUND,
            "peak RSS grew by {grown} bytes for a {STREAM}-byte stream"
        );
    }

    #[test]
    fn zeros_are_recognised() {
        assert!(is_zeros(&[]) && is_zeros(&[0]) && is_zeros(&[0; 4096]));
        let mut almost = vec![0u8; 4096];
        for at in [0, 1, 2048, 4095] {
            almost[at] = 1;
            assert!(!is_zeros(&almost), "{at}");
            almost[at] = 0;
        }
        assert!(!is_zeros(&[1; 10]));
    }

    /// Throughput on the local store, 512 MiB alternating 1 MiB of random
    /// bytes and 1 MiB of zeros, held in memory so only the store is
    /// measured. Prints MB/s; asserts only that everything round-trips.
    /// `cargo nextest run --lib snapshot::chunks::tests::measure_local_throughput --run-ignored only --no-capture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn measure_local_throughput() {
        const LEN: usize = 512 << 20;
        let dir = TempDir::new("chunks-measure");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        let mut data = Vec::with_capacity(LEN);
        for region in 0..(LEN >> 20) {
            if region % 2 == 0 {
                data.extend(random(region as u64 + 1, 1 << 20));
            } else {
                data.extend(std::iter::repeat_n(0u8, 1 << 20));
            }
        }
        let rate = |started: std::time::Instant| LEN as f64 / started.elapsed().as_secs_f64() / 1e6;
        let report = |what: &str, mbs: f64| println!("MEASURE {what:<48} {mbs:>8.0} MB/s");

        let mut manifests = vec![];
        for (owner, encoding) in [
            ("own_raw", None),
            ("own_lz4", Some((Algorithm::Lz4, 0))),
            ("own_zstd", Some((Algorithm::Zstd, 1))),
        ] {
            let t = std::time::Instant::now();
            let chunked = objects
                .put_chunked(owner, &data[..], &|_| false, encoding)
                .await
                .unwrap();
            let put = rate(t);
            let t = std::time::Instant::now();
            objects.sync_chunks().await.unwrap();
            let synced = t.elapsed();
            let stored: u64 = chunked.new.iter().map(|c| u64::from(c.stored_size)).sum();
            report(&format!("put_chunked, all new, {owner}"), put);
            println!(
                "MEASURE   {} chunks, {} distinct, {:.0} MiB stored, sync_chunks {:.2} s",
                chunked.entries.len(),
                chunked.new.len(),
                stored as f64 / (1 << 20) as f64,
                synced.as_secs_f64()
            );
            manifests.push((owner, chunked));
        }
        let known: HashSet<ChunkHash> = manifests[0].1.entries.iter().map(|e| e.hash).collect();
        let t = std::time::Instant::now();
        let again = objects
            .put_chunked("own_raw", &data[..], &|h| known.contains(h), None)
            .await
            .unwrap();
        report("put_chunked, all known (chunk + hash only)", rate(t));
        assert!(again.new.is_empty());

        // The alternative the brief names: fastcdc's AsyncStreamCDC on the
        // reactor, with the same hashing done inline.
        let t = std::time::Instant::now();
        let mut cdc = fastcdc::v2020::AsyncStreamCDC::new(
            &data[..],
            SIZES.min as usize,
            SIZES.avg as usize,
            SIZES.max as usize,
        );
        let mut lengths = vec![];
        let mut stream = Box::pin(cdc.as_stream());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            let _ = ChunkHash::of(&chunk.data);
            lengths.push(chunk.length as u32);
        }
        report("AsyncStreamCDC + BLAKE3 inline (no upload)", rate(t));
        let ours: Vec<u32> = again.entries.iter().map(|e| e.raw_size).collect();
        assert_eq!(lengths, ours);

        for (owner, chunked) in &manifests {
            let mut stored = HashMap::new();
            record(&mut stored, &chunked.new);
            let chunks = manifest(&chunked.entries, &stored);
            let t = std::time::Instant::now();
            let mut sink = tokio::io::sink();
            objects
                .get_chunked(owner, &chunks, &mut sink)
                .await
                .unwrap();
            report(&format!("get_chunked to a sink, {owner}"), rate(t));
            let dest = dir.path().join(format!("back-{owner}"));
            let t = std::time::Instant::now();
            objects
                .get_chunked_file(owner, &chunks, &dest)
                .await
                .unwrap();
            report(&format!("get_chunked_file, {owner}"), rate(t));
            assert!(std::fs::read(&dest).unwrap() == data);
            std::fs::remove_file(&dest).unwrap();
        }
    }

    /// A body that fails after `good` bytes, like a VMM dying mid-save.
    struct FailsAfter(Generated);

    impl AsyncRead for FailsAfter {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.0.left == 0 {
                return std::task::Poll::Ready(Err(io::Error::other("the VMM went away")));
            }
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    /// A stream that breaks off is an error, and whatever chunks were
    /// stored before it are whole: every object under a chunk key holds
    /// bytes whose BLAKE3 is that key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_stream_leaves_only_whole_chunks() {
        let dir = TempDir::new("chunks-broken");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        let body = FailsAfter(Generated {
            left: 5 << 20,
            x: 7,
        });
        let e = objects
            .put_chunked("own_b", body, &|_| false, Some((Algorithm::Zstd, 1)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("the VMM went away"), "{e}");
        let listed = objects.list_chunks(Some("own_b")).await.unwrap();
        assert!(!listed.is_empty(), "chunks before the break were stored");
        for c in listed {
            let key = Objects::chunk_key(&c.owner, &c.hash, c.encoding).unwrap();
            let raw = zstd::decode_all(&std::fs::read(root.join(&key)).unwrap()[..]).unwrap();
            assert_eq!(ChunkHash::of(&raw), c.hash, "{key}");
        }
    }

    /// CPU time per byte of each step of chunking, on one thread (so a
    /// loaded machine changes little): what bounds the sequential stage.
    /// `cargo nextest run --lib snapshot::chunks::tests::measure_step_costs --run-ignored only --no-capture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_step_costs() {
        fn cpu_now() -> std::time::Duration {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec for the duration of the call.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
        }
        const LEN: usize = 256 << 20;
        let data: Vec<u8> = (0..LEN >> 20)
            .flat_map(|r| {
                if r % 2 == 0 {
                    random(r as u64 + 1, 1 << 20)
                } else {
                    vec![0; 1 << 20]
                }
            })
            .collect();
        let per_byte = |what: &str, f: &mut dyn FnMut()| {
            let t = cpu_now();
            f();
            let ns = (cpu_now() - t).as_nanos() as f64 / LEN as f64;
            println!(
                "MEASURE {what:<32} {ns:.2} ns/byte ({:.0} MB/s of one core)",
                1e3 / ns
            );
        };
        per_byte("SHA-256", &mut || {
            std::hint::black_box(Sha256::digest(&data));
        });
        per_byte("BLAKE3 per 64 KiB", &mut || {
            for c in data.chunks(64 << 10) {
                std::hint::black_box(ChunkHash::of(c));
            }
        });
        per_byte("FastCDC cut points", &mut || {
            let n = fastcdc::v2020::FastCDC::new(&data, 16 << 10, 64 << 10, 256 << 10).count();
            std::hint::black_box(n);
        });
        per_byte("copy", &mut || {
            std::hint::black_box(data.clone());
        });
    }

    /// The manager captures in spawned tasks: these futures must be `Send`
    /// for any lifetime of their borrows (this does not compile otherwise).
    #[tokio::test]
    async fn capture_runs_in_a_spawned_task() {
        let dir = TempDir::new("chunks-spawned");
        let objects = Objects::local(&dir.path().join("store")).unwrap();
        let spawned = tokio::spawn(async move {
            let data = random(11, 300_000);
            let chunked = objects
                .put_chunked("own_t", &data[..], &|_| false, None)
                .await?;
            objects.sync_chunks().await?;
            let recoded = objects
                .recode_chunk("own_t", &chunked.new[0], (Algorithm::Lz4, 0))
                .await?;
            objects.delete_chunk("own_t", &recoded.hash, None).await?;
            Ok::<_, ObjectError>((objects.list_chunks(Some("own_t")).await?, chunked))
        });
        let (listed, chunked) = spawned.await.unwrap().unwrap();
        assert_eq!(listed.len(), chunked.new.len());
    }

    /// Every file under `dir`, read on this thread (not the blocking pool,
    /// where it would queue behind uploads still running).
    fn files_now(dir: &Path) -> Vec<PathBuf> {
        let mut out = vec![];
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                } else {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    /// A chunking call that fails part way returns only once none of its
    /// uploads is still writing: the store right after the error is the
    /// store for good, so the chunks a failed capture left can all be found
    /// and removed. One blocking thread beside the stream's cutter queues
    /// the uploads behind each other, so most are still to run when the
    /// first chunk's fails (its fan-out directory is a plain file).
    #[test]
    fn a_failed_chunking_leaves_nothing_writing_when_it_returns() {
        for stream in [false, true] {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(if stream { 2 } else { 1 })
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dir = TempDir::new("chunks-cut-short");
                let root = dir.path().join("store");
                let objects = Objects::local(&root).unwrap();
                let data = random(13, 4 << 20);
                let first = if stream {
                    let len = fastcdc::v2020::FastCDC::new(
                        &data,
                        SIZES.min as usize,
                        SIZES.avg as usize,
                        SIZES.max as usize,
                    )
                    .next()
                    .unwrap()
                    .length;
                    ChunkHash::of(&data[..len])
                } else {
                    ChunkHash::of(&data[..FILE_CHUNK as usize])
                };
                let key = Objects::chunk_key("own_x", &first, None).unwrap();
                let fan = root.join(key).parent().unwrap().to_path_buf();
                std::fs::create_dir_all(fan.parent().unwrap()).unwrap();
                std::fs::write(&fan, b"in the way").unwrap();
                let failed = if stream {
                    objects
                        .put_chunked("own_x", &data[..], &|_| false, None)
                        .await
                } else {
                    let file = dir.path().join("memory");
                    std::fs::write(&file, &data).unwrap();
                    objects.put_file_chunked("own_x", &file, &|_| false).await
                };
                assert!(failed.is_err(), "stream {stream}: the upload did not fail");
                let right_after = files_now(&root);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                assert_eq!(
                    files_now(&root),
                    right_after,
                    "stream {stream}: files were written after the call returned"
                );
            });
        }
    }
}
