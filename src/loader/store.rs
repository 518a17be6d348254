//! A compact decoded image store: every image decoded once (in parallel), optionally resized
//! to a working size, kept as packed RGB u8 in one contiguous buffer with an index. It can be
//! saved to one binary file and loaded back with a single read.
//!
//! File layout (little endian), written to a temporary name and renamed into place:
//! `b"MPCSIMG1"`, u32 version (1), u32 0, u64 count, [u8; 32] source key, u32 resize width,
//! u32 resize height (0 = none), then per image u32 width, u32 height, u64 offset, u32 name length,
//! name bytes; u64 data length, the pixel data; finally blake3 of everything before (32 bytes).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::geometry;
use super::image::Rgb8;
use super::LoaderError;

const MAGIC: &[u8; 8] = b"MPCSIMG1";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    offset: u64,
    width: u32,
    height: u32,
}

/// Decoded images in one buffer. Index `i` is the i-th source given to [`ImageStore::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStore {
    key: [u8; 32],
    resize: Option<(u32, u32)>,
    names: Vec<String>,
    entries: Vec<Entry>,
    data: Vec<u8>,
}

/// Identifies what a store was built from: blake3 over the resize target and, per source in
/// order, its path and byte length. Cheap (one stat per file); a file rewritten in place with the
/// same length is not noticed, which the runner's content fingerprints upstream already cover.
pub fn source_key(paths: &[PathBuf], resize: Option<(u32, u32)>) -> Result<[u8; 32], LoaderError> {
    let mut h = blake3::Hasher::new();
    h.update(b"mpcs-loader-store-v1");
    let (w, hh) = resize.unwrap_or((0, 0));
    h.update(&w.to_le_bytes());
    h.update(&hh.to_le_bytes());
    h.update(&(paths.len() as u64).to_le_bytes());
    for p in paths {
        let len = std::fs::metadata(p).map_err(|e| LoaderError::io(p, e))?.len();
        let s = p.to_string_lossy();
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
        h.update(&len.to_le_bytes());
    }
    Ok(*h.finalize().as_bytes())
}

/// Decodes one image file to RGB u8, optionally resized (`cv2.resize` INTER_LINEAR semantics).
pub fn decode(path: &Path, resize: Option<(u32, u32)>) -> Result<Rgb8, LoaderError> {
    let bad = |reason: String| LoaderError::Decode { path: path.to_path_buf(), reason };
    let reader = image::ImageReader::open(path)
        .map_err(|e| LoaderError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| LoaderError::io(path, e))?;
    let img = reader.decode().map_err(|e| bad(e.to_string()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(bad("the image is empty (0 pixels)".to_string()));
    }
    let img = Rgb8 { width: w, height: h, data: img.into_raw() };
    Ok(match resize {
        Some((rw, rh)) => geometry::resize(&img, rw as usize, rh as usize),
        None => img,
    })
}

impl ImageStore {
    /// Decodes `paths` in parallel (on the current rayon pool). Every file that fails is
    /// reported together in one [`LoaderError::Sources`].
    pub fn build(paths: &[PathBuf], resize: Option<(u32, u32)>) -> Result<ImageStore, LoaderError> {
        if let Some((w, h)) = resize {
            if w == 0 || h == 0 {
                return Err(LoaderError::BadConfig(format!("store resize {w}x{h}: both sides must be > 0")));
            }
        }
        let key = source_key(paths, resize)?;
        let decoded: Vec<Result<Rgb8, LoaderError>> = paths.par_iter().map(|p| decode(p, resize)).collect();
        let mut images = Vec::with_capacity(decoded.len());
        let mut errors = Vec::new();
        for r in decoded {
            match r {
                Ok(img) => images.push(img),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            return Err(LoaderError::Sources { failed: errors.len(), total: paths.len(), errors });
        }
        let names = paths.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        let mut store = ImageStore::from_images(names, images);
        store.key = key;
        store.resize = resize;
        Ok(store)
    }

    /// Builds a store from images already in memory (tests, benches, synthetic data); key zero.
    pub fn from_images(names: Vec<String>, images: Vec<Rgb8>) -> ImageStore {
        let total: usize = images.iter().map(|i| i.data.len()).sum();
        let mut data = Vec::with_capacity(total);
        let mut entries = Vec::with_capacity(images.len());
        for img in images {
            entries.push(Entry { offset: data.len() as u64, width: img.width as u32, height: img.height as u32 });
            data.extend_from_slice(&img.data);
        }
        ImageStore { key: [0; 32], resize: None, names, entries, data }
    }

    /// Loads `file` when it exists and was built from the same sources; otherwise builds and
    /// saves it (a corrupt or stale file is rebuilt, not trusted).
    pub fn load_or_build(
        file: &Path,
        paths: &[PathBuf],
        resize: Option<(u32, u32)>,
    ) -> Result<ImageStore, LoaderError> {
        let key = source_key(paths, resize)?;
        if file.exists() {
            if let Ok(s) = ImageStore::load(file, Some(&key)) {
                return Ok(s);
            }
        }
        let store = ImageStore::build(paths, resize)?;
        store.save(file)?;
        Ok(store)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The source key (see [`source_key`]); zero for [`ImageStore::from_images`].
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// (width, height) of image `i`.
    pub fn size(&self, i: usize) -> (usize, usize) {
        let e = &self.entries[i];
        (e.width as usize, e.height as usize)
    }

    /// The source path (or given name) of image `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Packed RGB bytes of image `i`.
    pub fn bytes(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        let start = e.offset as usize;
        &self.data[start..start + e.width as usize * e.height as usize * 3]
    }

    /// A copy of image `i`.
    pub fn image(&self, i: usize) -> Rgb8 {
        let (w, h) = self.size(i);
        Rgb8 { width: w, height: h, data: self.bytes(i).to_vec() }
    }

    /// Bytes of pixel data held.
    pub fn pixel_bytes(&self) -> usize {
        self.data.len()
    }

    /// Writes the store to `file` atomically (temporary name in the same folder, then rename).
    pub fn save(&self, file: &Path) -> Result<(), LoaderError> {
        let mut buf = Vec::with_capacity(self.data.len() + 64 + self.entries.len() * 64);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        buf.extend_from_slice(&self.key);
        let (rw, rh) = self.resize.unwrap_or((0, 0));
        buf.extend_from_slice(&rw.to_le_bytes());
        buf.extend_from_slice(&rh.to_le_bytes());
        for (e, n) in self.entries.iter().zip(&self.names) {
            buf.extend_from_slice(&e.width.to_le_bytes());
            buf.extend_from_slice(&e.height.to_le_bytes());
            buf.extend_from_slice(&e.offset.to_le_bytes());
            buf.extend_from_slice(&(n.len() as u32).to_le_bytes());
            buf.extend_from_slice(n.as_bytes());
        }
        buf.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        buf.extend_from_slice(&self.data);
        let digest = blake3::hash(&buf);
        buf.extend_from_slice(digest.as_bytes());

        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LoaderError::io(dir, e))?;
        }
        crate::fsutil::write_atomic(file, &buf).map_err(|e| LoaderError::io(file, e))
    }

    /// Reads a saved store with one read, checks its checksum and, when given, its source key.
    pub fn load(file: &Path, expect_key: Option<&[u8; 32]>) -> Result<ImageStore, LoaderError> {
        let mut buf = std::fs::read(file).map_err(|e| LoaderError::io(file, e))?;
        let corrupt = |reason: &str| LoaderError::CorruptStore { path: file.to_path_buf(), reason: reason.to_string() };
        if buf.len() < 8 + 8 + 8 + 32 + 8 + 8 + 32 || &buf[..8] != MAGIC {
            return Err(corrupt("not a loader store file (bad magic or too short)"));
        }
        let body = buf.len() - 32;
        if blake3::hash(&buf[..body]).as_bytes() != &buf[body..] {
            return Err(corrupt("checksum mismatch (truncated or damaged)"));
        }
        let mut r = Reader { buf: &buf[..body], pos: 8 };
        let bad = || corrupt("header runs past the end of the file");
        let version = r.u32().ok_or_else(bad)?;
        if version != VERSION {
            return Err(corrupt(&format!("format version {version}, this build reads {VERSION}")));
        }
        r.u32().ok_or_else(bad)?;
        let count = r.u64().ok_or_else(bad)? as usize;
        let key: [u8; 32] = r.take(32).ok_or_else(bad)?.try_into().map_err(|_| bad())?;
        let (rw, rh) = (r.u32().ok_or_else(bad)?, r.u32().ok_or_else(bad)?);
        if count > body / 20 {
            return Err(corrupt("image count larger than the file can hold"));
        }
        let mut entries = Vec::with_capacity(count);
        let mut names = Vec::with_capacity(count);
        for _ in 0..count {
            let (width, height, offset) =
                (r.u32().ok_or_else(bad)?, r.u32().ok_or_else(bad)?, r.u64().ok_or_else(bad)?);
            let n = r.u32().ok_or_else(bad)? as usize;
            let name = String::from_utf8_lossy(r.take(n).ok_or_else(bad)?).into_owned();
            entries.push(Entry { offset, width, height });
            names.push(name);
        }
        let data_len = r.u64().ok_or_else(bad)? as usize;
        let data_start = r.pos;
        if data_start.checked_add(data_len) != Some(body) {
            return Err(corrupt("pixel data length does not match the file size"));
        }
        for e in &entries {
            let end = (e.offset as u128) + (e.width as u128) * (e.height as u128) * 3;
            if end > data_len as u128 {
                return Err(corrupt("an index entry points past the pixel data"));
            }
        }
        if let Some(k) = expect_key {
            if k != &key {
                return Err(LoaderError::StaleStore { path: file.to_path_buf() });
            }
        }
        buf.truncate(body);
        buf.drain(..data_start);
        let resize = (rw != 0 && rh != 0).then_some((rw, rh));
        Ok(ImageStore { key, resize, names, entries, data: buf })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}
