//! The real libc functions behind every hook, resolved once with `dlsym(RTLD_NEXT)`.
//!
//! redhook resolves a pointer per hook too, but only inside the module that defines the hook; the
//! socket logic needs the real functions from everywhere (and for calls redhook cannot define, such
//! as variadic ones), so one table here serves all of them.

use std::sync::OnceLock;

use libc::{c_int, c_void, msghdr, size_t, sockaddr, socklen_t, ssize_t};

macro_rules! real_functions {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// Pointers to the next definition of each function after this library.
        pub struct Real {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        fn resolve() -> Real {
            Real {
                $($name: {
                    let name = concat!(stringify!($name), "\0");
                    // SAFETY: name is NUL-terminated; RTLD_NEXT finds libc's definition.
                    let pointer = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
                    assert!(!pointer.is_null(), "ftss-shim: libc has no {}", stringify!($name));
                    // SAFETY: the symbol is the libc function with exactly this C signature.
                    unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(pointer) }
                },)*
            }
        }
    };
}

real_functions! {
    socket: fn(c_int, c_int, c_int) -> c_int;
    bind: fn(c_int, *const sockaddr, socklen_t) -> c_int;
    connect: fn(c_int, *const sockaddr, socklen_t) -> c_int;
    sendto: fn(c_int, *const c_void, size_t, c_int, *const sockaddr, socklen_t) -> ssize_t;
    sendmsg: fn(c_int, *const msghdr, c_int) -> ssize_t;
    recvfrom: fn(c_int, *mut c_void, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t;
    recvmsg: fn(c_int, *mut msghdr, c_int) -> ssize_t;
    read: fn(c_int, *mut c_void, size_t) -> ssize_t;
    write: fn(c_int, *const c_void, size_t) -> ssize_t;
    close: fn(c_int) -> c_int;
    shutdown: fn(c_int, c_int) -> c_int;
    getsockname: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    getpeername: fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
    getsockopt: fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;
    setsockopt: fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int;
}

static REAL: OnceLock<Real> = OnceLock::new();

/// The real functions.
pub fn real() -> &'static Real {
    REAL.get_or_init(resolve)
}
