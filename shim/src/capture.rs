//! `FTSS_PCAP=FILE`: a pcap of what this process sent and received on the fabric, one IPv4/UDP
//! frame per datagram with its fabric addresses (like socket_wrapper's pcap file). Written with
//! fsbridge's pcap writer and flushed per datagram, so the file is readable while the app runs.

use std::fs::File;
use std::io::BufWriter;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Mutex;

use fsbridge::pcap::PcapWriter;
use libc::iovec;

use crate::log;

static PCAP: Mutex<Option<PcapWriter<BufWriter<File>>>> = Mutex::new(None);

/// Opens the capture file (truncating it); logs and carries on without one if it cannot.
pub fn open(path: &Path) {
    // The shim's own fd (see `sys::new_internal`): the app's close loops leave it open.
    let fd = crate::sys::new_internal(|| File::create(path).map_or(-1, std::os::fd::IntoRawFd::into_raw_fd));
    let writer = if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: new_internal returns an open fd that nothing else owns.
        PcapWriter::new(BufWriter::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
    };
    match writer {
        Ok(writer) => *PCAP.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(writer),
        Err(error) => log!("FTSS_PCAP {}: {error}; not capturing", path.display()),
    }
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(v6) => {
            SocketAddrV4::new(v6.ip().to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED), v6.port())
        }
    }
}

/// Records one datagram (no-op without FTSS_PCAP).
pub fn record(source: SocketAddr, destination: SocketAddr, payload: &[u8]) {
    let mut pcap = PCAP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let Some(writer) = pcap.as_mut() else { return };
    let written = writer
        .write_datagram(fsbridge::unix_now_us(), v4(source), v4(destination), payload)
        .and_then(|()| writer.flush());
    if let Err(error) = written {
        log!("FTSS_PCAP: {error}; capture stopped");
        if let Some(writer) = pcap.take() {
            // The shim's own fd: an ordinary drop would go through the app's close, which leaves it.
            let (file, _unwritten) = writer.into_inner().into_parts();
            crate::sys::close_internal(std::os::fd::IntoRawFd::into_raw_fd(file));
        }
    }
}

/// Is a capture open? (Saves gathering a received payload when not.)
pub fn active() -> bool {
    PCAP.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_some()
}

/// Records a received datagram whose payload sits in the app's buffers (first `length` bytes).
pub fn record_received(source: SocketAddr, destination: SocketAddr, iov: &[iovec], length: usize) {
    let mut payload = Vec::with_capacity(length);
    for vector in iov {
        if payload.len() >= length {
            break;
        }
        let take = vector.iov_len.min(length - payload.len());
        if take > 0 && !vector.iov_base.is_null() {
            // SAFETY: the kernel just filled these app buffers; `take` is within each one.
            payload.extend_from_slice(unsafe { std::slice::from_raw_parts(vector.iov_base.cast::<u8>(), take) });
        }
    }
    record(source, destination, &payload);
}
