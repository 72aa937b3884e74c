//! A vhost-user back-end served entirely by the Rust core: the smallest native device (it
//! negotiates and keeps ring state, nothing more). The round-trip benchmark measures our
//! protocol stack against it without any Python on the back-end side.
//!
//!     cargo run -p pyvhost-core --release --example null_backend -- SOCKET [--once]

use std::path::PathBuf;

use vhost_core::user::codes::{protocol_features as pf, VHOST_USER_F_PROTOCOL_FEATURES};
use vhost_core::user::{BackendHandler, BackendSession, Listener, Result};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;

struct NullDevice {
    bases: [u32; 2],
}

impl BackendHandler for NullDevice {
    fn max_queues(&self) -> u32 {
        2
    }
    fn get_features(&mut self) -> Result<u64> {
        Ok(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
    }
    fn get_protocol_features(&mut self) -> Result<u64> {
        Ok(pf::REPLY_ACK | pf::MQ)
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.bases[index as usize] = base;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<u32> {
        Ok(self.bases[index as usize])
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: null_backend SOCKET [--once]");
        std::process::exit(2);
    };
    let once = args.any(|a| a == "--once");
    let listener = Listener::bind(&path, true).unwrap_or_else(|e| {
        eprintln!("null_backend: cannot listen at {}: {e}", path.display());
        std::process::exit(1);
    });
    println!("ready");
    loop {
        let stream = match listener.accept(None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("null_backend: accept: {e}");
                std::process::exit(1);
            }
        };
        let mut device = NullDevice { bases: [0; 2] };
        if let Err(e) = BackendSession::new(stream).run(&mut device) {
            eprintln!("null_backend: session ended: {e}");
        }
        if once {
            break;
        }
    }
}
