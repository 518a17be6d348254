//! Pinned digests (sha256 or blake3, lowercase hex) and the streaming hasher that computes them.

use super::DownloadError;
use sha2::Digest as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DigestAlgo {
    Sha256,
    Blake3,
}

impl DigestAlgo {
    /// The key the experiment TOML uses for this algorithm (`sha256 = "..."`, `blake3 = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgo::Sha256 => "sha256",
            DigestAlgo::Blake3 => "blake3",
        }
    }
}

/// A digest: algorithm plus 64 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Digest {
    pub algo: DigestAlgo,
    pub hex: String,
}

impl Digest {
    /// Parse a pinned digest; accepts upper or lower case hex, stores lower case.
    pub fn parse(algo: DigestAlgo, value: &str) -> Result<Digest, DownloadError> {
        let hex = value.trim().to_ascii_lowercase();
        let bad = |reason: String| DownloadError::BadDigest { algo: algo.name(), value: value.to_string(), reason };
        if hex.len() != 64 {
            return Err(bad(format!("it has {} characters", hex.len())));
        }
        if let Some(c) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(bad(format!("`{c}` is not a hex digit")));
        }
        Ok(Digest { algo, hex })
    }

    pub fn sha256(value: &str) -> Result<Digest, DownloadError> {
        Digest::parse(DigestAlgo::Sha256, value)
    }

    pub fn blake3(value: &str) -> Result<Digest, DownloadError> {
        Digest::parse(DigestAlgo::Blake3, value)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = \"{}\"", self.algo.name(), self.hex)
    }
}

/// Incremental hasher over the bytes as they stream to disk (so the file is read once).
pub(crate) enum Hasher {
    Sha256(Box<sha2::Sha256>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub(crate) fn new(algo: DigestAlgo) -> Hasher {
        match algo {
            DigestAlgo::Sha256 => Hasher::Sha256(Box::default()),
            DigestAlgo::Blake3 => Hasher::Blake3(Box::default()),
        }
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    pub(crate) fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("{:x}", h.finalize()),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}
