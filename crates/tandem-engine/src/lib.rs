//! The tandem resource daemon: runs a [`tandem_core::Core`] over tokio with
//! real disk I/O, the authenticated peer link, the NBD frontend and the
//! control socket the `tandem` verbs talk to.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod control;
mod daemon;
mod link;

pub use daemon::{keep_payload_buffers, now_rfc3339, run, DaemonOptions};
