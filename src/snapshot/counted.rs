//! Counts the bytes that go into and come out of the object store, for the daemon's metrics.

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes moved to and from the store since the daemon started. Two relaxed
/// atomic adds per piece moved: no lock, nothing allocated.
#[derive(Debug, Default)]
pub struct Transfer {
    up: AtomicU64,
    down: AtomicU64,
}

impl Transfer {
    /// Bytes the store accepted (PUTs and multipart parts that succeeded,
    /// files written whole into the local directory).
    pub fn bytes_up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Bytes read from the store, as they arrive.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    pub(super) fn add_up(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn add_down(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
    }
}

/// An `ObjectStore` that tallies the payload bytes of what passes through
/// it into a `Transfer` and otherwise does exactly what the store inside
/// does. Server-side copies move no bytes through the daemon, so they count
/// nothing.
#[derive(Debug)]
pub(super) struct Counted {
    inner: Arc<dyn ObjectStore>,
    transfer: Arc<Transfer>,
}

impl Counted {
    pub(super) fn new(inner: Arc<dyn ObjectStore>, transfer: Arc<Transfer>) -> Counted {
        Counted { inner, transfer }
    }
}

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counted({})", self.inner)
    }
}

/// Counts the bytes of a GET's body as the caller reads them.
fn counted_get(r: GetResult, transfer: &Arc<Transfer>) -> GetResult {
    let payload = match r.payload {
        GetResultPayload::Stream(s) => {
            let transfer = Arc::clone(transfer);
            GetResultPayload::Stream(
                s.inspect(move |piece| {
                    if let Ok(bytes) = piece {
                        transfer.add_down(bytes.len() as u64);
                    }
                })
                .boxed(),
            )
        }
        // A local file handed out whole: its range is what the caller reads.
        file @ GetResultPayload::File(..) => {
            transfer.add_down(r.range.end - r.range.start);
            file
        }
    };
    GetResult { payload, ..r }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for Counted {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let n = payload.content_length() as u64;
        let put = self.inner.put_opts(location, payload, opts).await?;
        self.transfer.add_up(n);
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let upload = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(CountedUpload {
            upload,
            transfer: Arc::clone(&self.transfer),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let got = self.inner.get_opts(location, options).await?;
        Ok(counted_get(got, &self.transfer))
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let got = self.inner.get_ranges(location, ranges).await?;
        let n: usize = got.iter().map(Bytes::len).sum();
        self.transfer.add_down(n as u64);
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// A multipart upload whose parts count once the store took them.
#[derive(Debug)]
struct CountedUpload {
    upload: Box<dyn MultipartUpload>,
    transfer: Arc<Transfer>,
}

#[async_trait]
impl MultipartUpload for CountedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let n = data.content_length() as u64;
        let part = self.upload.put_part(data);
        let transfer = Arc::clone(&self.transfer);
        Box::pin(async move {
            part.await?;
            transfer.add_up(n);
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.upload.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.upload.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, WriteMultipart};

    #[tokio::test]
    async fn puts_parts_and_gets_are_counted_and_copies_are_not() {
        let transfer = Arc::new(Transfer::default());
        let store = Counted::new(Arc::new(InMemory::new()), Arc::clone(&transfer));
        store
            .put(&Path::from("a"), PutPayload::from(vec![1u8; 1000]))
            .await
            .unwrap();
        assert_eq!((transfer.bytes_up(), transfer.bytes_down()), (1000, 0));

        let upload = store.put_multipart(&Path::from("b")).await.unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 300);
        writer.write(&[2u8; 700]);
        writer.finish().await.unwrap();
        assert_eq!(transfer.bytes_up(), 1700);

        store
            .copy(&Path::from("b"), &Path::from("c"))
            .await
            .unwrap();
        assert_eq!(
            transfer.bytes_up(),
            1700,
            "a copy inside the store moves nothing"
        );

        let body = store
            .get(&Path::from("c"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body.len(), 700);
        assert_eq!(transfer.bytes_down(), 700);
        let ranges = store
            .get_ranges(&Path::from("a"), &[0..10, 20..30])
            .await
            .unwrap();
        assert_eq!(ranges.len(), 2);
        assert_eq!(transfer.bytes_down(), 720);
        // A failed read counts nothing.
        assert!(store.get(&Path::from("missing")).await.is_err());
        assert_eq!(transfer.bytes_down(), 720);
    }
}
