//! NBD server for tandem: the fixed-newstyle handshake and transmission codec
//! as pure code, and an async server that serves any
//! [`tandem_blockdev::BlockDevice`] over TCP or a Unix socket.
//!
//! Follows the NBD project's `doc/proto.md`; `docs/nbd.md` in this repository
//! lists what is supported and how each edge case is answered.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod codec;
pub mod handshake;
pub mod proto;
pub mod server;

pub use server::{serve, Gate, ListenAddr, Listener, ServerConfig, ServerStats, DEFAULT_IDLE_POLL};
