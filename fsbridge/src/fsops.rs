//! Every operation the spool makes on a path, in one place.
//!
//! Daemons such as dnsmasq, named, chronyd or rsyslogd bind their sockets as root and then drop
//! to an unprivileged user. From then on the volume, as root made it, may be closed to them. The
//! shim then forks a helper that keeps root (privilege separation, as OpenSSH does it) and
//! [`install`]s it here: from that moment every operation on a path inside the volume is made by
//! the helper, which hands back open file descriptors for opens (an open fd keeps the access it
//! was opened with, so reading, writing and syncing it need nothing more). Paths outside the
//! volume, and every process without a helper, get the calls of [`crate::disk`]: the plain system
//! calls, or the simulated disk on a thread that installed one.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::disk;
pub use crate::disk::{File, Meta, OpenOptions};

/// One operation for the helper, on paths relative to the volume ("" is the volume itself).
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// `open(2)` with these flags and mode; answered with the fd.
    Open {
        path: &'a Path,
        flags: i32,
        mode: u32,
    },
    Mkdir {
        path: &'a Path,
        mode: u32,
    },
    Rename {
        from: &'a Path,
        to: &'a Path,
    },
    Link {
        from: &'a Path,
        to: &'a Path,
    },
    Unlink {
        path: &'a Path,
    },
    Rmdir {
        path: &'a Path,
    },
    /// Sets the access and modification times to now.
    Touch {
        path: &'a Path,
    },
}

/// Makes [`Request`]s on the caller's behalf.
pub trait Helper: Send + Sync {
    /// Makes `request`: `Ok(Some(fd))` for an open, `Ok(None)` for the others.
    fn make(&self, request: Request<'_>) -> io::Result<Option<OwnedFd>>;
}

struct Installed {
    root: PathBuf,
    helper: Box<dyn Helper>,
}

static HELPER: OnceLock<Installed> = OnceLock::new();

/// From now on, operations on paths under `root` go through `helper`. Once per process; false if
/// one was installed already.
pub fn install(root: PathBuf, helper: Box<dyn Helper>) -> bool {
    HELPER.set(Installed { root, helper }).is_ok()
}

/// Is a helper making this process's volume operations?
pub fn helped() -> bool {
    HELPER.get().is_some()
}

/// The helper and `path` relative to its root, if `path` is under the root.
pub(crate) fn delegated(path: &Path) -> Option<(&'static dyn Helper, &Path)> {
    let installed = HELPER.get()?;
    let relative = path.strip_prefix(&installed.root).ok()?;
    Some((installed.helper.as_ref(), relative))
}

/// Both paths under the helper's root, or neither (EXDEV otherwise, as across mounts).
fn delegated_pair<'a>(from: &'a Path, to: &'a Path) -> io::Result<Option<(&'static dyn Helper, &'a Path, &'a Path)>> {
    match (delegated(from), delegated(to)) {
        (Some((helper, from)), Some((_, to))) => Ok(Some((helper, from, to))),
        (None, None) => Ok(None),
        _ => Err(io::Error::from_raw_os_error(libc::EXDEV)),
    }
}

pub(crate) fn helper_open(helper: &dyn Helper, path: &Path, flags: i32, mode: u32) -> io::Result<std::fs::File> {
    match helper.make(Request::Open { path, flags: flags | libc::O_CLOEXEC, mode })? {
        Some(fd) => Ok(std::fs::File::from(fd)),
        None => Err(io::Error::other("the privilege helper answered an open without an fd")),
    }
}

/// `File::open`: read only.
pub fn open(path: impl AsRef<Path>) -> io::Result<File> {
    OpenOptions::new().read(true).open(path)
}

pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    let mut text = String::new();
    open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

/// Metadata, following a final symlink.
pub fn metadata(path: impl AsRef<Path>) -> io::Result<Meta> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => {
            disk::open_kept(|| helper_open(helper, relative, libc::O_PATH, 0))?.file().metadata().map(Meta::from)
        }
        None => disk::metadata(path),
    }
}

/// Metadata of the path itself (a symlink is not followed).
pub fn symlink_metadata(path: impl AsRef<Path>) -> io::Result<Meta> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => {
            disk::open_kept(|| helper_open(helper, relative, libc::O_PATH | libc::O_NOFOLLOW, 0))?
                .file()
                .metadata()
                .map(Meta::from)
        }
        None => disk::symlink_metadata(path),
    }
}

pub fn create_dir(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => helper.make(Request::Mkdir { path: relative, mode: 0o777 }).map(drop),
        None => disk::create_dir(path),
    }
}

/// Creates `path` and its missing parents; an existing directory is fine.
pub fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    if delegated(path).is_none() {
        return disk::create_dir_all(path);
    }
    match create_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && metadata(path)?.is_dir => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let parent = path.parent().ok_or(error)?;
            create_dir_all(parent)?;
            match create_dir(path) {
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && metadata(path)?.is_dir => Ok(()),
                other => other,
            }
        }
        Err(error) => Err(error),
    }
}

pub fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    let (from, to) = (from.as_ref(), to.as_ref());
    match delegated_pair(from, to)? {
        Some((helper, from, to)) => helper.make(Request::Rename { from, to }).map(drop),
        None => disk::rename(from, to),
    }
}

pub fn hard_link(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    let (from, to) = (from.as_ref(), to.as_ref());
    match delegated_pair(from, to)? {
        Some((helper, from, to)) => helper.make(Request::Link { from, to }).map(drop),
        None => disk::hard_link(from, to),
    }
}

pub fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => helper.make(Request::Unlink { path: relative }).map(drop),
        None => disk::remove_file(path),
    }
}

pub fn remove_dir(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => helper.make(Request::Rmdir { path: relative }).map(drop),
        None => disk::remove_dir(path),
    }
}

/// Sets the access and modification times of `path` to now (`touch`).
pub fn touch(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => helper.make(Request::Touch { path: relative }).map(drop),
        None => disk::touch(path),
    }
}

/// fsyncs a directory, making the names in it durable.
pub fn sync_dir(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match delegated(path) {
        Some((helper, relative)) => {
            disk::open_kept(|| helper_open(helper, relative, libc::O_RDONLY | libc::O_DIRECTORY, 0))?.file().sync_all()
        }
        None => disk::sync_dir(path),
    }
}

/// The names in directory `path` (without `.` and `..`), in the order the directory gives them.
pub fn read_dir_names(path: impl AsRef<Path>) -> io::Result<Vec<OsString>> {
    let path = path.as_ref();
    let Some((helper, relative)) = delegated(path) else {
        return disk::read_dir_names(path);
    };
    let directory = disk::open_kept(|| helper_open(helper, relative, libc::O_RDONLY | libc::O_DIRECTORY, 0))?;
    disk::names_in(directory.file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A helper that makes each request itself (as root would) and records it.
    struct Recording {
        root: PathBuf,
        seen: Mutex<Vec<String>>,
    }

    impl Helper for Recording {
        fn make(&self, request: Request<'_>) -> io::Result<Option<OwnedFd>> {
            self.seen.lock().unwrap().push(format!("{request:?}"));
            let at = |path: &Path| self.root.join(path);
            match request {
                Request::Open { path, flags, mode } => {
                    let flags = nix::fcntl::OFlag::from_bits_retain(flags);
                    let mode = nix::sys::stat::Mode::from_bits_retain(mode);
                    Ok(Some(nix::fcntl::open(&at(path), flags, mode)?))
                }
                Request::Mkdir { path, .. } => std::fs::create_dir(at(path)).map(|()| None),
                Request::Rename { from, to } => std::fs::rename(at(from), at(to)).map(|()| None),
                Request::Link { from, to } => std::fs::hard_link(at(from), at(to)).map(|()| None),
                Request::Unlink { path } => std::fs::remove_file(at(path)).map(|()| None),
                Request::Rmdir { path } => std::fs::remove_dir(at(path)).map(|()| None),
                Request::Touch { path } => {
                    std::fs::File::options().write(true).open(at(path))?.set_modified(std::time::SystemTime::now())?;
                    Ok(None)
                }
            }
        }
    }

    /// With a helper installed, every operation under its root is a request to it (and works);
    /// a path outside it is the plain call, and a rename across the boundary is EXDEV.
    #[test]
    fn operations_under_the_root_go_through_the_helper() {
        let root = crate::test_dir("fsops");
        let outside = crate::test_dir("fsops-outside");
        let recording: &'static Recording =
            Box::leak(Box::new(Recording { root: root.clone(), seen: Mutex::new(Vec::new()) }));
        struct Forward(&'static Recording);
        impl Helper for Forward {
            fn make(&self, request: Request<'_>) -> io::Result<Option<OwnedFd>> {
                self.0.make(request)
            }
        }
        assert!(install(root.clone(), Box::new(Forward(recording))));
        assert!(helped());
        create_dir_all(root.join("a/b/c")).unwrap();
        create_dir_all(root.join("a/b/c")).unwrap();
        let file = root.join("a/b/c/file");
        std::io::Write::write_all(
            &mut OpenOptions::new().write(true).create_new(true).mode(0o600).open(&file).unwrap(),
            b"hello",
        )
        .unwrap();
        assert_eq!(read(&file).unwrap(), b"hello");
        assert_eq!(metadata(&file).unwrap().len, 5);
        touch(&file).unwrap();
        hard_link(&file, root.join("a/linked")).unwrap();
        rename(root.join("a/linked"), root.join("a/renamed")).unwrap();
        let mut names = read_dir_names(root.join("a")).unwrap();
        names.sort();
        assert_eq!(names, vec![OsString::from("b"), OsString::from("renamed")]);
        remove_file(root.join("a/renamed")).unwrap();
        assert!(symlink_metadata(root.join("a/renamed")).is_err());
        let error = rename(&file, outside.join("file")).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EXDEV));
        std::fs::write(outside.join("plain"), b"x").unwrap();
        assert_eq!(read(outside.join("plain")).unwrap(), b"x");
        let seen = recording.seen.lock().unwrap().join("\n");
        for kind in ["Mkdir", "Open", "Touch", "Link", "Rename", "Unlink"] {
            assert!(seen.contains(kind), "{kind} not asked of the helper:\n{seen}");
        }
        assert!(!seen.contains("plain"), "a path outside the root went to the helper:\n{seen}");
        remove_dir(root.join("a/b/c")).unwrap_err();
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }
}
