//! Native devices for the daemon framework.

pub mod blk;

pub use blk::{BlkConfig, BlkDevice};
