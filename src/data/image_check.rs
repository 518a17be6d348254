//! Image verification: every file is read and decoded in full (in parallel), because a
//! truncated PNG or TIFF has an intact header and only fails once its pixel data runs out.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageError, ImageFormat, ImageReader};
use rayon::prelude::*;

use super::error::{Problem, ProblemKind};

/// The image formats the datasets use, recognised by extension.
pub fn format_for(path: &Path) -> Option<ImageFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "png" => Some(ImageFormat::Png),
        "tif" | "tiff" => Some(ImageFormat::Tiff),
        _ => None,
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Png => "PNG",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

/// True when `bytes` starts with the magic number of `format`.
fn has_magic(bytes: &[u8], format: ImageFormat) -> bool {
    match format {
        ImageFormat::Png => bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        ImageFormat::Tiff => bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*"),
        _ => true,
    }
}

/// Whether a decoder error means "the data stopped early" rather than "the data is wrong".
fn is_truncation(err: &ImageError) -> bool {
    if let ImageError::IoError(e) = err {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return true;
        }
    }
    let msg = err.to_string().to_ascii_lowercase();
    ["eof", "end of file", "truncat", "unexpected end", "no more data", "not enough data"]
        .iter()
        .any(|k| msg.contains(k))
}

/// Reads and fully decodes one image; `Ok((width, height))` or the problem found.
pub fn check_image(path: &Path) -> Result<(u32, u32), Problem> {
    let problem = |kind, detail: String| Problem { path: path.to_path_buf(), kind, detail };
    let Some(format) = format_for(path) else {
        return Err(problem(ProblemKind::NotAnImage, "not a .png/.tif file".to_string()));
    };
    let name = format_name(format);
    let bytes = std::fs::read(path).map_err(|e| problem(ProblemKind::Unreadable, format!("cannot read: {e}")))?;
    if bytes.is_empty() {
        return Err(problem(ProblemKind::ZeroByte, "zero-byte file".to_string()));
    }
    if !has_magic(&bytes, format) {
        return Err(problem(
            ProblemKind::NotAnImage,
            format!("not a {name} file (its first bytes are {:02x?})", &bytes[..bytes.len().min(8)]),
        ));
    }
    let decoded = ImageReader::with_format(Cursor::new(&bytes), format).decode();
    match decoded {
        Ok(img) => Ok((img.width(), img.height())),
        Err(e) if is_truncation(&e) => Err(problem(
            ProblemKind::Truncated,
            format!("truncated {name} (file ends after {} bytes: {e})", bytes.len()),
        )),
        Err(e) => Err(problem(ProblemKind::Corrupt, format!("{name} does not decode: {e}"))),
    }
}

/// Checks every path in parallel and returns the problems, sorted by path.
pub fn check_images(paths: &[PathBuf]) -> Vec<Problem> {
    let mut problems: Vec<Problem> = paths.par_iter().filter_map(|p| check_image(p).err()).collect();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems
}

/// Cheap check without reading: zero-byte and unstat-able files, in parallel.
pub fn check_sizes(paths: &[PathBuf]) -> Vec<Problem> {
    let mut problems: Vec<Problem> = paths
        .par_iter()
        .filter_map(|p| match std::fs::metadata(p) {
            Ok(m) if m.len() == 0 => {
                Some(Problem { path: p.clone(), kind: ProblemKind::ZeroByte, detail: "zero-byte file".to_string() })
            }
            Ok(_) => None,
            Err(e) => {
                Some(Problem { path: p.clone(), kind: ProblemKind::Unreadable, detail: format!("cannot read: {e}") })
            }
        })
        .collect();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems
}
