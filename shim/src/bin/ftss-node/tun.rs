//! The TUN device: created, given the node's address, brought up, and routed to; and the
//! capabilities the agent keeps once it is (`CAP_NET_ADMIN` only).

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use fsbridge::ip::Cidr;

/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const NAME_BYTES_MAX: usize = 15;

/// The kernel's `struct rtentry` (SIOCADDRT), which the libc crate defines only for musl.
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    destination: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    device: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is valid.
    let mut request: libc::ifreq = unsafe { zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(addr).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn check(result: libc::c_int, what: &str) -> io::Result<()> {
    if result < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("{what}: {error}")));
    }
    Ok(())
}

/// The open TUN device (non-blocking; one IP packet a read or write, no packet-info header).
pub struct Tun {
    fd: OwnedFd,
    pub name: String,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`, gives it `addr`/32 and `mtu`, brings it
    /// up, and routes each of `routes` through it. IPv6 is switched off on it: only IPv4 is
    /// carried.
    pub fn create(name: &str, addr: Ipv4Addr, mtu: u32, routes: &[Cidr]) -> io::Result<Tun> {
        if name.is_empty() || name.len() > NAME_BYTES_MAX || name.contains(['/', ' ', '\0']) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
        }
        let path = CString::new("/dev/net/tun").expect("no NUL");
        // SAFETY: a valid C string.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        check(raw, "opening /dev/net/tun")?;
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF takes a pointer to an ifreq.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut request) }, "TUNSETIFF")?;
        let tun = Tun { fd, name: name.to_owned() };
        tun.configure(addr, mtu, routes)?;
        // Persistent while the agent runs: killed, it leaves the interface with its address and
        // routes, so the node's connections and bound sockets outlive a restart (the kernel queues,
        // then drops, what is sent meanwhile). A clean stop, or a failed start after this, ends
        // that (`release`). Set once configured: a setup that fails leaves no interface behind.
        // SAFETY: TUNSETPERSIST takes an integer.
        check(unsafe { libc::ioctl(tun.fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) }, "TUNSETPERSIST")?;
        Ok(tun)
    }

    /// At a clean stop: the interface goes when the device is closed.
    pub fn release(&self) {
        // SAFETY: TUNSETPERSIST takes an integer.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) };
    }

    fn configure(&self, addr: Ipv4Addr, mtu: u32, routes: &[Cidr]) -> io::Result<()> {
        // SAFETY: plain socket creation.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(raw, "socket for interface ioctls")?;
        // SAFETY: raw is a fresh fd we own.
        let control = unsafe { OwnedFd::from_raw_fd(raw) };
        let control = control.as_raw_fd();
        // Before the device is up, so that it never gets an IPv6 link-local address.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", self.name), "1");
        let mut request = ifreq(&self.name);
        request.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        // SAFETY: each SIOC* request below takes a pointer to an ifreq.
        check(unsafe { libc::ioctl(control, libc::SIOCSIFADDR, &mut request) }, "setting the address")?;
        let mut request = ifreq(&self.name);
        request.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::BROADCAST);
        check(unsafe { libc::ioctl(control, libc::SIOCSIFNETMASK, &mut request) }, "setting the netmask")?;
        let mut request = ifreq(&self.name);
        request.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        check(unsafe { libc::ioctl(control, libc::SIOCSIFMTU, &mut request) }, "setting the MTU")?;
        let mut request = ifreq(&self.name);
        check(unsafe { libc::ioctl(control, libc::SIOCGIFFLAGS, &mut request) }, "reading the flags")?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        request.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(unsafe { libc::ioctl(control, libc::SIOCSIFFLAGS, &mut request) }, "bringing the interface up")?;
        let device = CString::new(self.name.as_str()).expect("checked: no NUL");
        for route in routes {
            // SAFETY: an all-zero rtentry is valid.
            let mut entry: RtEntry = unsafe { zeroed() };
            entry.destination = sockaddr_v4(route.network());
            entry.genmask = sockaddr_v4(route.netmask());
            entry.flags = libc::RTF_UP;
            entry.device = device.as_ptr().cast_mut();
            // SAFETY: SIOCADDRT takes a pointer to an rtentry; `device` outlives the call.
            let added = unsafe { libc::ioctl(control, libc::SIOCADDRT, &mut entry) };
            if added < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                check(added, &format!("adding the route {route}"))?;
            }
        }
        Ok(())
    }

    /// Reads one packet into `buffer`; `None` when none is waiting.
    pub fn read(&self, buffer: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buffer is valid for its length.
        let read = unsafe { libc::read(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if read < 0 {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
                _ => Err(error),
            };
        }
        Ok(Some(read as usize))
    }

    /// Hands one packet to the kernel's stack, as if it had arrived on the interface.
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: packet is valid for its length.
        let written = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for a packet to read.
    pub fn wait_readable(&self, timeout_ms: libc::c_int) {
        let mut fds = [libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
    }
}

/// `CAP_NET_ADMIN`'s bit.
const CAP_NET_ADMIN: u32 = 12;

/// Keeps `CAP_NET_ADMIN` (effective and permitted) and drops every other capability, for good
/// (with no new privileges from exec'd programs either).
pub fn keep_only_net_admin() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header { version: VERSION_3, pid: 0 };
    let keep = 1u32 << CAP_NET_ADMIN;
    let data = [
        Data { effective: keep, permitted: keep, inheritable: 0 },
        Data { effective: 0, permitted: 0, inheritable: 0 },
    ];
    // SAFETY: prctl with plain integer arguments.
    let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) }, "PR_SET_NO_NEW_PRIVS")?;
    // SAFETY: capset takes a v3 header and two data structs.
    let result = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    check(result as libc::c_int, "capset")?;
    let _ = size_of::<Data>();
    Ok(())
}
