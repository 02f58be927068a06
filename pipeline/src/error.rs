//! The pipeline crate's error type: every variant names the file, shard or key it is about.

use std::path::PathBuf;

/// Errors from reading and writing the shard format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A manifest is missing fields, is of another format or version, or contradicts itself.
    #[error("manifest {path}: {message}")]
    Manifest {
        /// Where the manifest came from.
        path: String,
        /// What is wrong, and what to do about it.
        message: String,
    },
    /// A shard's bytes could not be read as a tar (or zstd-compressed tar) stream.
    #[error("shard {shard}: {source}")]
    ShardIo {
        /// The shard's name.
        shard: String,
        /// The underlying read error (corrupt zstd frame, truncated tar, ...).
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("configuration: {message}")]
    Config {
        /// What is wrong, and what to do about it.
        message: String,
    },
    /// The object store (or local folder) could not be reached or read.
    #[error("{location}: {message}")]
    Source {
        /// The URL or path being read.
        location: String,
        /// What went wrong, and what to do about it.
        message: String,
    },
    /// A loader thread panicked: a bug in this crate or a library it calls.
    #[error("internal error: {message}; this is a bug, please report it with the input")]
    Internal {
        /// Which thread, and what the panic said.
        message: String,
    },
    /// A shard is a valid tar stream but breaks the sample layout.
    #[error("shard {shard}: {message}")]
    Layout {
        /// The shard's name.
        shard: String,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
