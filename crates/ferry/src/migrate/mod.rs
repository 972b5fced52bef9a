//! Live migration: the source side (`ferry migrate`), the target side
//! (`ferry agent`), the convergence controllers that decide when pre-copy
//! stops, and the target's in-memory page map.

pub mod agent;
pub mod controller;
pub mod lazyfill;
pub mod mempages;
pub mod postcopy;
pub mod report;
mod sender;
pub mod source;

use crate::checkpoint::CheckpointError;
use crate::image::ImageError;
use crate::proc::ProcError;
use crate::restore::RestoreError;
use crate::track::TrackError;
use crate::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Track(#[from] TrackError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("{0}")]
    Stream(String),
    #[error("{0}")]
    Refused(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}
