//! The file calls of the server's durable state, with a simulated disk behind them on demand.
//!
//! Code that keeps durable state (the server's queue) makes its file calls here rather than
//! through `std::fs`. They are the plain system calls, except on a thread where the simulator has
//! [`sim::install`]ed a [`sim::SimDisk`]: there every call is answered by that in-memory disk,
//! which keeps what was synced apart from what was only written, loses or tears the rest in a
//! crash, and fails calls on the simulator's schedule. The same code is thus checked against
//! thousands of crash and fault schedules per second (see `ftss-server/src/sim.rs`).

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

pub mod sim;

/// What the queue asks of a file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub len: u64,
    /// Links to the file: 0 once it is removed from its directory (while still open).
    pub nlink: u64,
    pub is_dir: bool,
}

impl From<std::fs::Metadata> for Meta {
    fn from(meta: std::fs::Metadata) -> Meta {
        Meta { len: meta.len(), nlink: meta.nlink(), is_dir: meta.is_dir() }
    }
}

/// An open file: a real one, or one of the simulated disk.
#[derive(Debug)]
pub enum File {
    Real(std::fs::File),
    Sim(sim::Handle),
}

/// `std::fs::OpenOptions` for [`File`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub(crate) read: bool,
    pub(crate) write: bool,
    pub(crate) append: bool,
    pub(crate) truncate: bool,
    pub(crate) create: bool,
    pub(crate) create_new: bool,
}

impl OpenOptions {
    pub fn new() -> OpenOptions {
        OpenOptions::default()
    }

    pub fn read(&mut self, read: bool) -> &mut Self {
        self.read = read;
        self
    }

    pub fn write(&mut self, write: bool) -> &mut Self {
        self.write = write;
        self
    }

    pub fn append(&mut self, append: bool) -> &mut Self {
        self.append = append;
        self
    }

    pub fn truncate(&mut self, truncate: bool) -> &mut Self {
        self.truncate = truncate;
        self
    }

    pub fn create(&mut self, create: bool) -> &mut Self {
        self.create = create;
        self
    }

    pub fn create_new(&mut self, create_new: bool) -> &mut Self {
        self.create_new = create_new;
        self
    }

    pub fn open(&self, path: impl AsRef<Path>) -> io::Result<File> {
        let path = path.as_ref();
        if let Some(disk) = sim::current() {
            return disk.open(path, *self).map(File::Sim);
        }
        std::fs::OpenOptions::new()
            .read(self.read)
            .write(self.write)
            .append(self.append)
            .truncate(self.truncate)
            .create(self.create)
            .create_new(self.create_new)
            .open(path)
            .map(File::Real)
    }
}

impl File {
    /// Opens for reading.
    pub fn open(path: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new().read(true).open(path)
    }

    /// Creates (or truncates) for writing.
    pub fn create(path: impl AsRef<Path>) -> io::Result<File> {
        OpenOptions::new().write(true).create(true).truncate(true).open(path)
    }

    pub fn sync_data(&self) -> io::Result<()> {
        match self {
            File::Real(file) => file.sync_data(),
            File::Sim(handle) => handle.sync(),
        }
    }

    pub fn sync_all(&self) -> io::Result<()> {
        match self {
            File::Real(file) => file.sync_all(),
            File::Sim(handle) => handle.sync(),
        }
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            File::Real(file) => file.set_len(len),
            File::Sim(handle) => handle.set_len(len),
        }
    }

    pub fn metadata(&self) -> io::Result<Meta> {
        match self {
            File::Real(file) => file.metadata().map(Meta::from),
            File::Sim(handle) => handle.metadata(),
        }
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            File::Real(file) => file.read(buf),
            File::Sim(handle) => handle.read(buf),
        }
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            File::Real(file) => file.write(buf),
            File::Sim(handle) => handle.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileExt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            File::Real(file) => file.read_at(buf, offset),
            File::Sim(handle) => handle.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match self {
            File::Real(file) => file.write_at(buf, offset),
            File::Sim(handle) => handle.write_at(buf, offset),
        }
    }
}

/// The whole file.
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read(path)?).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

/// Creates or truncates the file and writes `bytes` (not synced).
pub fn write(path: impl AsRef<Path>, bytes: &[u8]) -> io::Result<()> {
    File::create(path)?.write_all(bytes)
}

/// Writes a new file (it must not exist) and syncs it; the directory is not synced.
pub fn write_new_synced(path: impl AsRef<Path>, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// fsyncs a directory, making the names in it durable.
pub fn sync_dir(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    match sim::current() {
        Some(disk) => disk.sync_dir(path),
        None => std::fs::File::open(path)?.sync_all(),
    }
}

pub fn rename(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(disk) => disk.rename(from.as_ref(), to.as_ref()),
        None => std::fs::rename(from, to),
    }
}

pub fn remove_file(path: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(disk) => disk.remove(path.as_ref(), false),
        None => std::fs::remove_file(path),
    }
}

/// Removes an empty directory.
pub fn remove_dir(path: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(disk) => disk.remove(path.as_ref(), true),
        None => std::fs::remove_dir(path),
    }
}

pub fn create_dir(path: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(disk) => disk.create_dir(path.as_ref(), false),
        None => std::fs::create_dir(path),
    }
}

pub fn create_dir_all(path: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(disk) => disk.create_dir(path.as_ref(), true),
        None => std::fs::create_dir_all(path),
    }
}

pub fn metadata(path: impl AsRef<Path>) -> io::Result<Meta> {
    match sim::current() {
        Some(disk) => disk.metadata(path.as_ref()),
        None => std::fs::metadata(path).map(Meta::from),
    }
}

pub fn is_dir(path: impl AsRef<Path>) -> bool {
    metadata(path).is_ok_and(|meta| meta.is_dir)
}

pub fn exists(path: impl AsRef<Path>) -> bool {
    metadata(path).is_ok()
}

/// The names in a directory (without `.` and `..`), in no set order.
pub fn read_dir_names(path: impl AsRef<Path>) -> io::Result<Vec<OsString>> {
    match sim::current() {
        Some(disk) => disk.list(path.as_ref()),
        None => std::fs::read_dir(path)?.map(|entry| entry.map(|entry| entry.file_name())).collect(),
    }
}

/// Size and free bytes (for this user) of the file system holding `path`.
pub fn space(path: impl AsRef<Path>) -> Option<(u64, u64)> {
    match sim::current() {
        Some(disk) => Some(disk.space()),
        None => {
            let stat = nix::sys::statvfs::statvfs(path.as_ref()).ok()?;
            Some((stat.blocks() * stat.fragment_size(), stat.blocks_available() * stat.fragment_size()))
        }
    }
}

/// A random number: the simulator's (so that a seed replays exactly), or the kernel's.
pub fn random_u64() -> u64 {
    match sim::current() {
        Some(disk) => disk.random(),
        None => crate::random_u64(),
    }
}
