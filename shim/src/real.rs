//! The real libc functions behind every hook, resolved once with `dlsym(RTLD_NEXT)`.
//!
//! The constructor calls [`real`] before anything else, so no hook ever resolves a symbol lazily
//! (glibc's `dlsym` allocates, which can recurse into a hooked call or deadlock). The shim's own code
//! calls these pointers, never `libc::x`, because `libc::x` from inside this library binds to the
//! shim's exported hook of the same name.

use std::sync::OnceLock;

use libc::{c_int, c_uint, c_ulong, c_void, iovec, mmsghdr, msghdr, size_t, sockaddr, socklen_t, ssize_t, timespec};

macro_rules! real_functions {
    ($($name:ident: $signature:ty;)*) => {
        /// Pointers to the next definition of each function after this library.
        pub struct Real {
            /// glibc 2.34+; an app can only call the hook if its libc has it.
            pub close_range: Option<CloseRange>,
            /// glibc 2.28+; as above.
            pub fcntl64: Option<Fcntl>,
            $(pub $name: $signature,)*
        }

        fn resolve() -> Real {
            Real {
                close_range: optional(c"close_range").map(|pointer| {
                    // SAFETY: glibc's close_range has this signature.
                    unsafe { std::mem::transmute::<*mut c_void, CloseRange>(pointer) }
                }),
                fcntl64: optional(c"fcntl64").map(|pointer| {
                    // SAFETY: glibc's fcntl64 has fcntl's signature.
                    unsafe { std::mem::transmute::<*mut c_void, Fcntl>(pointer) }
                }),
                $($name: {
                    // redhook's resolver: dlsym(RTLD_NEXT) of a NUL-terminated name. A libc without
                    // one of these is not a glibc this shim supports; there is no errno to give and
                    // no safe way to continue, so it stops the process at load time (in the
                    // constructor, before the app runs).
                    // SAFETY: the name is NUL-terminated.
                    let pointer = unsafe { redhook::ld_preload::dlsym_next(concat!(stringify!($name), "\0")) };
                    // SAFETY: the symbol is the libc function with exactly this C signature.
                    unsafe { std::mem::transmute::<*const u8, $signature>(pointer) }
                },)*
            }
        }
    };
}

real_functions! {
    socket: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
    socketpair: unsafe extern "C" fn(c_int, c_int, c_int, *mut c_int) -> c_int;
    bind: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
    connect: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
    sendto: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int, *const sockaddr, socklen_t) -> ssize_t;
    sendmsg: unsafe extern "C" fn(c_int, *const msghdr, c_int) -> ssize_t;
    sendmmsg: unsafe extern "C" fn(c_int, *mut mmsghdr, c_uint, c_int) -> c_int;
    recvfrom: unsafe extern "C" fn(c_int, *mut c_void, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t;
    recvmsg: unsafe extern "C" fn(c_int, *mut msghdr, c_int) -> ssize_t;
    recvmmsg: unsafe extern "C" fn(c_int, *mut mmsghdr, c_uint, c_int, *mut timespec) -> c_int;
    read: unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t;
    readv: unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t;
    write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t;
    writev: unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t;
    close: unsafe extern "C" fn(c_int) -> c_int;
    dup: unsafe extern "C" fn(c_int) -> c_int;
    dup2: unsafe extern "C" fn(c_int, c_int) -> c_int;
    dup3: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
    // Variadic in C: called through a variadic pointer so the calling convention is exactly C's.
    fcntl: Fcntl;
    ioctl: unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
    poll: unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
    shutdown: unsafe extern "C" fn(c_int, c_int) -> c_int;
    getsockname: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    getpeername: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    getsockopt: unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;
    setsockopt: unsafe extern "C" fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int;
    __chk_fail: unsafe extern "C" fn() -> !;
    setuid: unsafe extern "C" fn(libc::uid_t) -> c_int;
    setgid: unsafe extern "C" fn(libc::gid_t) -> c_int;
    seteuid: unsafe extern "C" fn(libc::uid_t) -> c_int;
    setegid: unsafe extern "C" fn(libc::gid_t) -> c_int;
    setreuid: unsafe extern "C" fn(libc::uid_t, libc::uid_t) -> c_int;
    setregid: unsafe extern "C" fn(libc::gid_t, libc::gid_t) -> c_int;
    setresuid: unsafe extern "C" fn(libc::uid_t, libc::uid_t, libc::uid_t) -> c_int;
    setresgid: unsafe extern "C" fn(libc::gid_t, libc::gid_t, libc::gid_t) -> c_int;
    setgroups: unsafe extern "C" fn(size_t, *const libc::gid_t) -> c_int;
    initgroups: unsafe extern "C" fn(*const libc::c_char, libc::gid_t) -> c_int;
}

type CloseRange = unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
type Fcntl = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;

fn optional(name: &std::ffi::CStr) -> Option<*mut c_void> {
    // SAFETY: name is NUL-terminated.
    let pointer = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    (!pointer.is_null()).then_some(pointer)
}

static REAL: OnceLock<Real> = OnceLock::new();

/// The real functions (resolved by the constructor; lazily only if a hook runs before it).
pub fn real() -> &'static Real {
    REAL.get_or_init(resolve)
}
