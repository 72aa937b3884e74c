//! Native devices for the daemon framework, and the image files they serve.

pub mod blk;
pub mod image;

pub use blk::{BlkConfig, BlkDevice};
pub use image::{Image, ImageError, Locking};
