//! On-disk metadata of a tandem resource, with DRBD's semantics: a
//! superblock holding the generation identifiers and flags, an activity log
//! of hot 4 MiB extents, and an out-of-sync bitmap of 4 KiB blocks.
//!
//! Pure code over the small synchronous [`MetaIo`] trait: the engine runs it
//! on a blocking thread, tests run it over [`CrashDisk`], which can lose or
//! tear unsynced writes. See `docs/on-disk-format.md` for the format.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod al;
pub mod bitmap;
pub mod dump;
pub mod io;
pub mod layout;
mod md;
pub mod superblock;

pub use bitmap::Bitmap;
pub use io::{CrashDisk, CrashMode, FileIo, MetaIo};
pub use layout::{Layout, Placement};
pub use md::{Existing, Metadata, OpenReport};
pub use superblock::{Generations, SlotError, Superblock};

/// What can go wrong with metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The device cannot hold the metadata and a useful amount of data.
    #[error("{what} is too small: {size} bytes, need at least {need}")]
    TooSmall {
        /// Which device.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The minimum.
        need: u64,
    },
    /// Neither superblock slot holds tandem metadata.
    #[error("no tandem metadata found (run create-md first)")]
    NotFound,
    /// Neither superblock slot is usable; says why for each.
    #[error("corrupted superblock: slot A: {0}; slot B: {1}")]
    Corrupt(SlotError, SlotError),
    /// Written by a newer (or unrelated) tandem.
    #[error("unknown metadata format version {0} (this tandem reads version {v})", v = superblock::VERSION)]
    UnknownVersion(u32),
    /// Anything else that does not make sense.
    #[error("{0}")]
    Invalid(String),
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being read or written.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> MetaError {
    let context = context.into();
    move |source| MetaError::Io { context, source }
}
