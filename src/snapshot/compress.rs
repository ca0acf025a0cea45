//! Compression of the memory object: the settings of the Hypeman API (`{enabled, algorithm, level}`),
//! their validation and defaults, and the streaming encoders/decoders behind `Objects::compress`
//! and `Objects::get_file_decompressed`.

use async_compression::tokio::bufread::{Lz4Decoder, Lz4Encoder, ZstdDecoder, ZstdEncoder};
use async_compression::Level;
use std::ops::RangeInclusive;
use tokio::io::{AsyncBufRead, AsyncRead};

/// A compression algorithm for the memory object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Zstd,
    Lz4,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Zstd => "zstd",
            Algorithm::Lz4 => "lz4",
        }
    }

    /// The levels the Hypeman API allows (zstd 1-19, lz4 0-9).
    pub fn levels(self) -> RangeInclusive<i64> {
        match self {
            Algorithm::Zstd => 1..=19,
            Algorithm::Lz4 => 0..=9,
        }
    }

    /// The level used when none is given (Hypeman API: zstd 1, lz4 0), the fastest of each.
    pub fn default_level(self) -> i32 {
        match self {
            Algorithm::Zstd => 1,
            Algorithm::Lz4 => 0,
        }
    }

    /// Compresses what `raw` yields, as the algorithm's standard frame format.
    pub(crate) fn encoder<'a>(
        self,
        level: i32,
        raw: impl AsyncBufRead + Unpin + Send + 'a,
    ) -> Box<dyn AsyncRead + Unpin + Send + 'a> {
        let level = Level::Precise(level);
        match self {
            Algorithm::Zstd => Box::new(ZstdEncoder::with_quality(raw, level)),
            Algorithm::Lz4 => Box::new(Lz4Encoder::with_quality(raw, level)),
        }
    }

    /// Decompresses what `compressed` yields.
    pub(crate) fn decoder<'a>(
        self,
        compressed: impl AsyncBufRead + Unpin + Send + 'a,
    ) -> Box<dyn AsyncRead + Unpin + Send + 'a> {
        match self {
            Algorithm::Zstd => Box::new(ZstdDecoder::new(compressed)),
            Algorithm::Lz4 => Box::new(Lz4Decoder::new(compressed)),
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Hypeman API's `SnapshotCompressionConfig`, as it arrives in a request and as it is shown.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i64>,
}

impl CompressionConfig {
    /// Checks the level against the algorithm's range. A disabled config is always valid:
    /// the Hypeman API says algorithm and level are ignored then.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let algorithm = self.algorithm.unwrap_or(Algorithm::Zstd);
        let range = algorithm.levels();
        match self.level {
            Some(level) if !range.contains(&level) => Err(format!(
                "compression.level must be between {} and {} for {algorithm}, got {level}",
                range.start(),
                range.end()
            )),
            _ => Ok(()),
        }
    }

    /// What to run: `None` when disabled, else the algorithm and level with the Hypeman API's defaults
    /// filled in. Meant for a validated config; an out-of-range level is clamped into range.
    pub fn effective(&self) -> Option<(Algorithm, i32)> {
        if !self.enabled {
            return None;
        }
        let algorithm = self.algorithm.unwrap_or(Algorithm::Zstd);
        let level = match self.level {
            Some(l) => {
                let r = algorithm.levels();
                l.clamp(*r.start(), *r.end()) as i32
            }
            None => algorithm.default_level(),
        };
        Some((algorithm, level))
    }

    /// The config as it is stored and shown: defaults made explicit, ignored fields dropped.
    pub fn normalized(&self) -> CompressionConfig {
        match self.effective() {
            None => CompressionConfig::default(),
            Some((algorithm, level)) => CompressionConfig {
                enabled: true,
                algorithm: Some(algorithm),
                level: Some(level.into()),
            },
        }
    }

    /// Parses an operator's setting: `none` or `off`, `zstd`, `zstd:LEVEL`, `lz4`, `lz4:LEVEL`.
    /// The result is validated and normalized.
    pub fn parse_setting(s: &str) -> Result<CompressionConfig, String> {
        let s = s.trim().to_ascii_lowercase();
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n.trim(), Some(l.trim())),
            None => (s.as_str(), None),
        };
        let algorithm = match name {
            "none" | "off" if level.is_none() => return Ok(CompressionConfig::default()),
            "zstd" => Algorithm::Zstd,
            "lz4" => Algorithm::Lz4,
            _ => {
                return Err(format!(
                "{s:?} is not a compression setting (use none, zstd, zstd:LEVEL, lz4 or lz4:LEVEL)"
            ))
            }
        };
        let level = match level {
            None => None,
            Some(l) => Some(
                l.parse::<i64>()
                    .map_err(|_| format!("compression level {l:?} is not a whole number"))?,
            ),
        };
        let cfg = CompressionConfig {
            enabled: true,
            algorithm: Some(algorithm),
            level,
        };
        cfg.validate()?;
        Ok(cfg.normalized())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testing::{sample_memory, S3sFs, TempDir};
    use crate::snapshot::{ObjectError, Objects, Stored};
    use sha2::{Digest, Sha256};
    use std::path::{Path, PathBuf};

    fn enabled(algorithm: Option<Algorithm>, level: Option<i64>) -> CompressionConfig {
        CompressionConfig {
            enabled: true,
            algorithm,
            level,
        }
    }

    #[test]
    fn levels_are_checked_against_the_algorithm() {
        assert_eq!(
            enabled(None, Some(20)).validate().unwrap_err(),
            "compression.level must be between 1 and 19 for zstd, got 20"
        );
        assert_eq!(
            enabled(Some(Algorithm::Zstd), Some(0))
                .validate()
                .unwrap_err(),
            "compression.level must be between 1 and 19 for zstd, got 0"
        );
        assert_eq!(
            enabled(Some(Algorithm::Lz4), Some(10))
                .validate()
                .unwrap_err(),
            "compression.level must be between 0 and 9 for lz4, got 10"
        );
        assert!(enabled(Some(Algorithm::Lz4), Some(-1)).validate().is_err());
        for l in 1..=19 {
            enabled(Some(Algorithm::Zstd), Some(l)).validate().unwrap();
        }
        for l in 0..=9 {
            enabled(Some(Algorithm::Lz4), Some(l)).validate().unwrap();
        }
        // Disabled: whatever else is there is ignored, as the Hypeman API says.
        let off = CompressionConfig {
            enabled: false,
            algorithm: Some(Algorithm::Lz4),
            level: Some(99),
        };
        off.validate().unwrap();
        assert_eq!(off.effective(), None);
        assert_eq!(off.normalized(), CompressionConfig::default());
    }

    #[test]
    fn defaults_follow_the_hypeman_api() {
        assert_eq!(enabled(None, None).effective(), Some((Algorithm::Zstd, 1)));
        assert_eq!(
            enabled(Some(Algorithm::Lz4), None).effective(),
            Some((Algorithm::Lz4, 0))
        );
        assert_eq!(
            enabled(Some(Algorithm::Zstd), Some(7)).effective(),
            Some((Algorithm::Zstd, 7))
        );
        assert_eq!(
            enabled(None, Some(5)).normalized(),
            enabled(Some(Algorithm::Zstd), Some(5))
        );
        assert_eq!(
            enabled(Some(Algorithm::Lz4), None).normalized(),
            enabled(Some(Algorithm::Lz4), Some(0))
        );
    }

    #[test]
    fn json_shape_matches_the_hypeman_api() {
        let c: CompressionConfig =
            serde_json::from_str(r#"{"enabled":true,"algorithm":"lz4","level":3}"#).unwrap();
        assert_eq!(c, enabled(Some(Algorithm::Lz4), Some(3)));
        let c: CompressionConfig = serde_json::from_str(r#"{"enabled":false}"#).unwrap();
        assert_eq!(c, CompressionConfig::default());
        // `enabled` is the one required field.
        assert!(serde_json::from_str::<CompressionConfig>(r#"{"algorithm":"zstd"}"#).is_err());
        assert!(serde_json::from_str::<CompressionConfig>(
            r#"{"enabled":true,"algorithm":"gzip"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<CompressionConfig>(r#"{"enabled":true,"lvl":3}"#).is_err());
        assert_eq!(
            serde_json::to_string(&CompressionConfig::default()).unwrap(),
            r#"{"enabled":false}"#
        );
        assert_eq!(
            serde_json::to_string(&enabled(None, Some(3)).normalized()).unwrap(),
            r#"{"enabled":true,"algorithm":"zstd","level":3}"#
        );
    }

    #[test]
    fn operator_settings() {
        let p = CompressionConfig::parse_setting;
        assert_eq!(p("none").unwrap(), CompressionConfig::default());
        assert_eq!(p(" OFF ").unwrap(), CompressionConfig::default());
        assert_eq!(p("zstd").unwrap(), enabled(Some(Algorithm::Zstd), Some(1)));
        assert_eq!(
            p("zstd:19").unwrap(),
            enabled(Some(Algorithm::Zstd), Some(19))
        );
        assert_eq!(p("lz4").unwrap(), enabled(Some(Algorithm::Lz4), Some(0)));
        assert_eq!(p("Lz4:9").unwrap(), enabled(Some(Algorithm::Lz4), Some(9)));
        assert!(p("zstd:20").unwrap_err().contains("between 1 and 19"));
        assert!(p("lz4:10").unwrap_err().contains("between 0 and 9"));
        assert!(p("zstd:fast").unwrap_err().contains("not a whole number"));
        assert!(p("gzip").unwrap_err().contains("not a compression setting"));
        assert!(p("none:3")
            .unwrap_err()
            .contains("not a compression setting"));
    }

    /// Compresses `data` at each given setting through the local store and returns the sizes.
    async fn compressed_sizes(data: &[u8], settings: &[(Algorithm, i32)]) -> Vec<u64> {
        let dir = TempDir::new("compress-levels");
        let objects = Objects::local(&dir.path().join("store")).unwrap();
        let src = dir.path().join("raw");
        std::fs::write(&src, data).unwrap();
        objects.put_file("raw", &src).await.unwrap();
        let mut sizes = vec![];
        for &(a, l) in settings {
            sizes.push(objects.compress("raw", "out", a, l).await.unwrap().size);
        }
        sizes
    }

    /// Text-like data: compressible, but only well with effort (long-range repeats of
    /// pseudo-random words), so that higher levels have something to find.
    fn texty(len: usize) -> Vec<u8> {
        let words: Vec<String> = (0..4000u32)
            .map(|i| format!("w{:x} ", i.wrapping_mul(2654435761) % 100_000))
            .collect();
        let mut out = Vec::with_capacity(len);
        let mut x = 0x9e37_79b9u32;
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.extend_from_slice(words[(x % 4000) as usize].as_bytes());
        }
        out.truncate(len);
        out
    }

    #[tokio::test]
    async fn higher_levels_compress_smaller() {
        let data = texty(2 << 20);
        let s = compressed_sizes(
            &data,
            &[
                (Algorithm::Zstd, 1),
                (Algorithm::Zstd, 19),
                (Algorithm::Lz4, 0),
                (Algorithm::Lz4, 9),
            ],
        )
        .await;
        assert!(s[1] < s[0], "zstd 19 ({}) vs zstd 1 ({})", s[1], s[0]);
        assert!(s[3] < s[2], "lz4 9 ({}) vs lz4 0 ({})", s[3], s[2]);
        assert!(s.iter().all(|&n| n < data.len() as u64), "{s:?}");
    }

    #[tokio::test]
    async fn every_level_round_trips() {
        let dir = TempDir::new("compress-every-level");
        let objects = Objects::local(&dir.path().join("store")).unwrap();
        let data = texty(64 << 10);
        let src = dir.path().join("raw");
        std::fs::write(&src, &data).unwrap();
        let raw = objects.put_file("raw", &src).await.unwrap();
        let all = Algorithm::Zstd
            .levels()
            .map(|l| (Algorithm::Zstd, l))
            .chain(Algorithm::Lz4.levels().map(|l| (Algorithm::Lz4, l)));
        for (a, l) in all {
            let stored = objects.compress("raw", "out", a, l as i32).await.unwrap();
            let back = dir.path().join("back");
            objects
                .get_file_decompressed("out", &back, &stored, a, &raw)
                .await
                .unwrap_or_else(|e| panic!("{a} {l}: {e}"));
            assert!(std::fs::read(&back).unwrap() == data, "{a} {l}");
        }
    }

    /// The checks every store must pass: round trip, sizes, format, corruption, absence.
    async fn check_compression(
        objects: &Objects,
        backing: &dyn Fn(&str) -> PathBuf,
        scratch: &Path,
    ) {
        // Big enough that the compressed object (about half) takes more than one 8 MiB part.
        let data = sample_memory(24 << 20);
        let src = scratch.join("memory");
        std::fs::write(&src, &data).unwrap();
        let raw = objects.put_file("snap/memory", &src).await.unwrap();

        for (algorithm, level, magic) in [
            (Algorithm::Zstd, 1, [0x28, 0xb5, 0x2f, 0xfd]),
            (Algorithm::Lz4, 0, [0x04, 0x22, 0x4d, 0x18]),
        ] {
            let key = format!("snap/memory.{algorithm}");
            let stored = objects
                .compress("snap/memory", &key, algorithm, level)
                .await
                .unwrap();
            assert!(
                stored.size < raw.size && stored.size > crate::snapshot::CHUNK as u64,
                "{algorithm}: {} of {}",
                stored.size,
                raw.size
            );
            let on_disk = std::fs::read(backing(&key)).unwrap();
            assert_eq!(stored.size, on_disk.len() as u64);
            assert_eq!(stored.sha256, hex::encode(Sha256::digest(&on_disk)));
            // The standard frame format, so `zstd -d` / `lz4 -d` can read a stored object.
            assert_eq!(on_disk[..4], magic, "{algorithm} frame magic");

            let back = scratch.join(format!("back-{algorithm}"));
            objects
                .get_file_decompressed(&key, &back, &stored, algorithm, &raw)
                .await
                .unwrap();
            assert!(
                std::fs::read(&back).unwrap() == data,
                "{algorithm} round trip"
            );

            // The recorded raw checksum is checked too, not only the compressed one.
            let wrong_raw = Stored {
                size: raw.size,
                sha256: hex::encode(Sha256::digest(b"something else")),
            };
            let dest = scratch.join(format!("wrong-{algorithm}"));
            let e = objects
                .get_file_decompressed(&key, &dest, &stored, algorithm, &wrong_raw)
                .await
                .unwrap_err();
            assert!(matches!(e, ObjectError::Corrupt { .. }), "{e}");
            assert_nothing_at(&dest);

            // One flipped byte in the compressed object, early (likely undecodable) and late
            // (likely decodable to wrong bytes): caught either way, nothing written.
            for at in [100, on_disk.len() - 100] {
                let mut bad = on_disk.clone();
                bad[at] ^= 0x40;
                std::fs::write(backing(&key), &bad).unwrap();
                let dest = scratch.join(format!("corrupt-{algorithm}-{at}"));
                let e = objects
                    .get_file_decompressed(&key, &dest, &stored, algorithm, &raw)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(e, ObjectError::Corrupt { .. }),
                    "{algorithm}@{at}: {e}"
                );
                assert_nothing_at(&dest);
            }

            // Bytes after the end of the frame are not what was stored either.
            let mut longer = on_disk.clone();
            longer.extend_from_slice(b"trailing");
            std::fs::write(backing(&key), &longer).unwrap();
            let dest = scratch.join(format!("longer-{algorithm}"));
            let e = objects
                .get_file_decompressed(&key, &dest, &stored, algorithm, &raw)
                .await
                .unwrap_err();
            assert!(matches!(e, ObjectError::Corrupt { .. }), "{algorithm}: {e}");
            assert_nothing_at(&dest);

            objects.delete(&key).await.unwrap();
            let dest = scratch.join(format!("gone-{algorithm}"));
            let e = objects
                .get_file_decompressed(&key, &dest, &stored, algorithm, &raw)
                .await
                .unwrap_err();
            assert!(matches!(e, ObjectError::Missing(_)), "{e}");
            assert_nothing_at(&dest);
        }

        let e = objects
            .compress("snap/nothing", "snap/nothing.zstd", Algorithm::Zstd, 1)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ObjectError::Missing(k) if k == "snap/nothing"),
            "{e}"
        );
    }

    fn assert_nothing_at(dest: &Path) {
        assert!(
            !dest.exists() && !dest.with_extension("partial").exists(),
            "{} or its partial file was left behind",
            dest.display()
        );
    }

    #[tokio::test]
    async fn local_store_compresses_and_verifies() {
        let dir = TempDir::new("compress-local");
        let root = dir.path().join("store");
        let objects = Objects::local(&root).unwrap();
        check_compression(&objects, &|k| root.join(k), dir.path()).await;
    }

    #[tokio::test]
    async fn s3_store_compresses_and_verifies() {
        let s3 = S3sFs::start();
        let objects = Objects::s3(&s3.config()).unwrap();
        check_compression(&objects, &|k| s3.object_file(k), &s3.scratch()).await;
    }

    /// Throughput of `compress` on a memory-like file, for the report; not a timed test.
    /// `cargo test --release --lib compress_throughput -- --ignored --nocapture`
    #[tokio::test]
    #[ignore]
    async fn compress_throughput() {
        let dir = TempDir::new("compress-throughput");
        let objects = Objects::local(&dir.path().join("store")).unwrap();
        let src = dir.path().join("memory");
        std::fs::write(&src, sample_memory(256 << 20)).unwrap();
        let raw = objects.put_file("memory", &src).await.unwrap();
        for (a, l) in [(Algorithm::Zstd, 1), (Algorithm::Lz4, 0)] {
            let t = std::time::Instant::now();
            let c = objects.compress("memory", "out", a, l).await.unwrap();
            let secs = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            let back = dir.path().join("back");
            objects
                .get_file_decompressed("out", &back, &c, a, &raw)
                .await
                .unwrap();
            let back_secs = t.elapsed().as_secs_f64();
            println!(
                "{a}-{l}: {} MiB -> {} MiB in {secs:.2} s ({:.0} MiB/s); decompress+verify {back_secs:.2} s ({:.0} MiB/s)",
                raw.size >> 20,
                c.size >> 20,
                (raw.size >> 20) as f64 / secs,
                (raw.size >> 20) as f64 / back_secs,
            );
        }
    }
}
