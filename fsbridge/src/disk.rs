//! The file calls of the server's durable state, with a simulated disk behind them on demand.
//!
//! Code that keeps durable state (the server's queue) makes its file calls here rather than
//! through `std::fs`. They are the plain system calls, except on a thread where the simulator has
//! [`sim::install`]ed a [`sim::SimDisk`]: there every call is answered by that in-memory disk,
//! which keeps what was synced apart from what was only written, loses or tears the rest in a
//! crash, and fails calls on the simulator's schedule. The same code is thus checked against
//! thousands of crash and fault schedules per second (see `ftss-server/src/sim.rs`).
//!
//! [`crate::fsops`] is the front door the spool uses: it sends operations on the volume to the
//! shim's privilege helper when one is installed, and everything else here.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod sim;

/// Keeps a process's file fds apart from code that shares its fd table and closes fds it does not
/// own: the shim runs inside an app, whose "close every fd above 2" loop would otherwise close the
/// shim's outbox log under it, and the app's next open would get the number, so that a batch
/// meant for the volume would be written and synced into the app's file.
pub trait FdKeeper: Send + Sync {
    /// Runs `open` (an fd, or -1 with errno set) and takes the fd for the process's own, so that
    /// another thread's close cannot take it. The fd it returns may differ; -1 with errno set if
    /// it could not be taken.
    fn keep(&self, open: &mut dyn FnMut() -> RawFd) -> RawFd;
    /// Gives up and closes one fd that [`FdKeeper::keep`] returned.
    fn close(&self, fd: RawFd) -> io::Result<()>;
}

static KEEPER: OnceLock<&'static dyn FdKeeper> = OnceLock::new();

/// From now on, every real file this module opens is kept by `keeper` and closed through it. Once
/// per process, before any file is opened; false if one was set already.
pub fn keep_fds(keeper: &'static dyn FdKeeper) -> bool {
    KEEPER.set(keeper).is_ok()
}

/// Opens a real file with `open`, kept if a keeper is set.
pub(crate) fn open_kept(open: impl FnOnce() -> io::Result<std::fs::File>) -> io::Result<RealFile> {
    let Some(keeper) = KEEPER.get() else { return open().map(|file| RealFile(Some(file))) };
    let mut open = Some(open);
    let mut failure = None;
    let fd = keeper.keep(&mut || match open.take().map(|open| open()) {
        Some(Ok(file)) => file.into_raw_fd(),
        Some(Err(error)) => {
            failure = Some(error);
            -1
        }
        None => -1,
    });
    if fd < 0 {
        return Err(failure.unwrap_or_else(io::Error::last_os_error));
    }
    // SAFETY: the keeper returned an open fd that nothing else owns.
    Ok(RealFile(Some(unsafe { std::fs::File::from_raw_fd(fd) })))
}

/// A real open file; closed through the keeper, if one is set.
#[derive(Debug)]
pub struct RealFile(Option<std::fs::File>);

impl RealFile {
    pub(crate) fn file(&self) -> &std::fs::File {
        self.0.as_ref().expect("a RealFile holds its file until it is dropped")
    }

    fn close(mut self) -> io::Result<()> {
        let file = self.0.take().expect("a RealFile holds its file until it is dropped");
        match KEEPER.get() {
            Some(keeper) => keeper.close(file.into_raw_fd()),
            None => nix::unistd::close(file).map_err(io::Error::from),
        }
    }
}

impl Drop for RealFile {
    fn drop(&mut self) {
        if let Some(file) = self.0.take() {
            match KEEPER.get() {
                Some(keeper) => {
                    let _ = keeper.close(file.into_raw_fd());
                }
                None => drop(file),
            }
        }
    }
}

/// What the spool and the queue ask of a file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub len: u64,
    /// Links to the file: 0 once it is removed from its directory (while still open).
    pub nlink: u64,
    pub is_dir: bool,
    /// A regular file (not a directory, symlink, fifo, device or socket).
    pub is_file: bool,
    pub is_symlink: bool,
    pub ino: u64,
    /// The owner's user id.
    pub uid: u32,
    /// The last modification of the data.
    pub modified: SystemTime,
}

impl From<std::fs::Metadata> for Meta {
    fn from(meta: std::fs::Metadata) -> Meta {
        Meta {
            len: meta.len(),
            nlink: meta.nlink(),
            is_dir: meta.is_dir(),
            is_file: meta.file_type().is_file(),
            is_symlink: meta.file_type().is_symlink(),
            ino: meta.ino(),
            uid: meta.uid(),
            modified: meta.modified().unwrap_or(UNIX_EPOCH),
        }
    }
}

/// An open file: a real one, or one of the simulated disk.
#[derive(Debug)]
pub enum File {
    Real(RealFile),
    Sim(sim::Handle),
}

/// `std::fs::OpenOptions` for [`File`]s.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    pub(crate) read: bool,
    pub(crate) write: bool,
    pub(crate) append: bool,
    pub(crate) truncate: bool,
    pub(crate) create: bool,
    pub(crate) create_new: bool,
    pub(crate) mode: u32,
    pub(crate) custom_flags: i32,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions {
            read: false,
            write: false,
            append: false,
            truncate: false,
            create: false,
            create_new: false,
            mode: 0o666,
            custom_flags: 0,
        }
    }
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

    /// The permission bits of a created file (before the umask); 0o666 unless set.
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }

    /// More `open(2)` flags (`O_NOFOLLOW`, `O_NONBLOCK`…); the simulated disk ignores them.
    pub fn custom_flags(&mut self, flags: i32) -> &mut Self {
        self.custom_flags = flags;
        self
    }

    /// The `open(2)` flags these options stand for.
    pub(crate) fn flags(&self) -> i32 {
        let mut flags = self.custom_flags
            | match (self.read, self.write || self.append) {
                (true, true) => libc::O_RDWR,
                (false, true) => libc::O_WRONLY,
                _ => libc::O_RDONLY,
            };
        if self.append {
            flags |= libc::O_APPEND;
        }
        if self.truncate {
            flags |= libc::O_TRUNC;
        }
        if self.create_new {
            flags |= libc::O_CREAT | libc::O_EXCL;
        } else if self.create {
            flags |= libc::O_CREAT;
        }
        flags
    }

    /// Opens `path`: on the simulated disk if this thread has one, through the privilege helper
    /// if `path` is under its root, else with `open(2)`.
    pub fn open(&self, path: impl AsRef<Path>) -> io::Result<File> {
        let path = path.as_ref();
        if let Some(disk) = sim::current() {
            return disk.open(path, *self).map(File::Sim);
        }
        if let Some((helper, relative)) = crate::fsops::delegated(path) {
            return open_kept(|| crate::fsops::helper_open(helper, relative, self.flags(), self.mode)).map(File::Real);
        }
        open_kept(|| {
            std::fs::OpenOptions::new()
                .read(self.read)
                .write(self.write)
                .append(self.append)
                .truncate(self.truncate)
                .create(self.create)
                .create_new(self.create_new)
                .mode(self.mode)
                .custom_flags(self.custom_flags)
                .open(path)
        })
        .map(File::Real)
    }
}

/// `statx` of an open file for its size and link count alone (see [`File::size_and_links`]).
fn statx_size_and_links(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: statx is plain old data; all zeros is a valid value.
    let mut stat: libc::statx = unsafe { std::mem::zeroed() };
    let mask = libc::STATX_SIZE | libc::STATX_NLINK;
    // SAFETY: an empty C string with AT_EMPTY_PATH names `fd` itself; `stat` is a valid buffer.
    let result = unsafe { libc::statx(fd, c"".as_ptr(), libc::AT_EMPTY_PATH, mask, &mut stat) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    if stat.stx_mask & mask != mask {
        return Err(io::Error::other("statx did not return the size and link count"));
    }
    Ok((stat.stx_size, u64::from(stat.stx_nlink)))
}

/// `fstat` of an open file for its size and link count.
fn fstat_size_and_links(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: stat is plain old data; all zeros is a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `stat` is a valid buffer for one struct stat.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stat.st_size as u64, stat.st_nlink as u64))
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
            File::Real(file) => file.file().sync_data(),
            File::Sim(handle) => handle.sync(),
        }
    }

    pub fn sync_all(&self) -> io::Result<()> {
        match self {
            File::Real(file) => file.file().sync_all(),
            File::Sim(handle) => handle.sync(),
        }
    }

    pub fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            File::Real(file) => file.file().set_len(len),
            File::Sim(handle) => handle.set_len(len),
        }
    }

    pub fn metadata(&self) -> io::Result<Meta> {
        match self {
            File::Real(file) => file.file().metadata().map(Meta::from),
            File::Sim(handle) => handle.metadata(),
        }
    }

    /// The file's length and link count, asking the kernel for nothing else. A stat that reads
    /// the modification time makes the file's next write stamp a new one at fine grain (Linux's
    /// multigrain timestamps, 6.13 and later), which dirties the inode; on this machine's ext4 the
    /// writer's next fdatasync then writes the inode block too, a second I/O in series: 1.5 × the
    /// wall time of a 4.6 KB write and sync (123 → 184 µs), measured with and without an fstat
    /// between syncs. Callers that stat a file someone syncs on every write use this instead of
    /// [`File::metadata`].
    pub fn size_and_links(&self) -> io::Result<(u64, u64)> {
        match self {
            File::Real(file) => match statx_size_and_links(file.file().as_raw_fd()) {
                // A kernel without statx, or a seccomp filter that refuses it (older container
                // profiles answer EPERM): a plain fstat still answers, at the cost above. (Not
                // std's `metadata`, which tries statx first and, once statx has worked in this
                // process, returns its error.)
                Err(error) if matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    fstat_size_and_links(file.file().as_raw_fd())
                }
                result => result,
            },
            File::Sim(handle) => handle.metadata().map(|meta| (meta.len, meta.nlink)),
        }
    }

    /// Closes the file and reports the close's error (NFS may report a failed write back here).
    pub fn close(self) -> io::Result<()> {
        match self {
            File::Real(file) => file.close(),
            File::Sim(handle) => {
                drop(handle);
                Ok(())
            }
        }
    }
}

impl Read for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            File::Real(file) => (&mut file.file()).read(buf),
            File::Sim(handle) => handle.read(buf),
        }
    }
}

impl Write for File {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            File::Real(file) => (&mut file.file()).write(buf),
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
            File::Real(file) => file.file().read_at(buf, offset),
            File::Sim(handle) => handle.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match self {
            File::Real(file) => file.file().write_at(buf, offset),
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
        None => open_kept(|| std::fs::File::open(path))?.file().sync_all(),
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

/// Metadata of the path itself (a final symlink is not followed; the simulated disk has none).
pub fn symlink_metadata(path: impl AsRef<Path>) -> io::Result<Meta> {
    match sim::current() {
        Some(disk) => disk.metadata(path.as_ref()),
        None => std::fs::symlink_metadata(path).map(Meta::from),
    }
}

/// A second name for a file (the simulated disk has no hard links: EPERM, as on file systems
/// without them).
pub fn hard_link(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(_) => Err(io::Error::from_raw_os_error(libc::EPERM)),
        None => std::fs::hard_link(from, to),
    }
}

/// Sets the modification time of `path` to now.
pub fn touch(path: impl AsRef<Path>) -> io::Result<()> {
    match sim::current() {
        Some(disk) => disk.touch(path.as_ref()),
        None => {
            let now = nix::sys::time::TimeSpec::UTIME_NOW;
            let follow = nix::sys::stat::UtimensatFlags::FollowSymlink;
            nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, path.as_ref(), &now, &now, follow).map_err(io::Error::from)
        }
    }
}

/// The wall clock in microseconds since the Unix epoch: the simulator's, or the system's.
pub fn unix_now_us() -> u64 {
    match sim::current() {
        Some(disk) => disk.unix_now_us(),
        None => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_micros() as u64),
    }
}

/// The wall clock as a `SystemTime` (see [`unix_now_us`]).
pub fn system_now() -> SystemTime {
    match sim::current() {
        Some(disk) => UNIX_EPOCH + Duration::from_micros(disk.unix_now_us()),
        None => SystemTime::now(),
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
        None => {
            let path = path.as_ref();
            let open = || std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(path);
            names_in(open_kept(open)?.file())
        }
    }
}

/// The names in an open directory (without `.` and `..`), read with getdents64 on the fd itself:
/// `opendir` would open an fd of its own, which no keeper sees, and `closedir` would close it.
pub(crate) fn names_in(directory: &std::fs::File) -> io::Result<Vec<OsString>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    // struct linux_dirent64: inode (8), offset (8), record length (2), type (1), then the name.
    const NAME_AT: usize = 19;
    let mut buffer = vec![0u8; 32 * 1024];
    let mut names = Vec::new();
    loop {
        // SAFETY: getdents64 writes at most buffer.len() bytes into the live buffer.
        let filled =
            unsafe { libc::syscall(libc::SYS_getdents64, directory.as_raw_fd(), buffer.as_mut_ptr(), buffer.len()) };
        if filled < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if filled == 0 {
            return Ok(names);
        }
        let filled = filled as usize;
        let mut at = 0;
        while at + NAME_AT <= filled {
            let length = usize::from(u16::from_ne_bytes([buffer[at + 16], buffer[at + 17]]));
            if length <= NAME_AT || at + length > filled {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a malformed directory entry"));
            }
            let field = &buffer[at + NAME_AT..at + length];
            let name = &field[..field.iter().position(|byte| *byte == 0).unwrap_or(field.len())];
            if name != b"." && name != b".." {
                names.push(OsString::from(std::ffi::OsStr::from_bytes(name)));
            }
            at += length;
        }
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
    crate::random_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_links_follow_appends_and_removal() {
        let path = std::env::temp_dir().join(format!("ftss-size-links-{}-{}", std::process::id(), random_u64()));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        assert_eq!(file.size_and_links().unwrap(), (0, 1));
        file.write_all_at(&[7; 4_600], 0).unwrap();
        file.write_all_at(&[0; 4_096], 4_600).unwrap();
        assert_eq!(file.size_and_links().unwrap(), (8_696, 1));
        std::fs::hard_link(&path, path.with_extension("second")).unwrap();
        assert_eq!(file.size_and_links().unwrap().1, 2);
        std::fs::remove_file(path.with_extension("second")).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Removed while open: the link count a sync checks to find a segment unlinked under it.
        assert_eq!(file.size_and_links().unwrap(), (8_696, 0));
    }

    /// A seccomp filter on this thread alone that refuses `statx` with EPERM, as older container
    /// profiles do.
    fn refuse_statx_on_this_thread() {
        let statement = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter { code: code as u16, jt, jf, k };
        let program = [
            // The syscall number is the first word of seccomp_data.
            statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
            statement(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, libc::SYS_statx as u32),
            statement(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            statement(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let filter = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr().cast_mut() };
        // SAFETY: prctl with these options reads only the filter program, which outlives the call.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &filter as *const _), 0);
        }
    }

    #[test]
    fn size_and_links_answers_where_statx_is_refused() {
        let path = std::env::temp_dir().join(format!("ftss-no-statx-{}-{}", std::process::id(), random_u64()));
        std::fs::write(&path, [1; 300]).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // A thread of its own: the filter stays with the thread, which ends with the test.
        let answer = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    refuse_statx_on_this_thread();
                    // SAFETY: an empty path with AT_EMPTY_PATH names fd 0; the buffer is valid.
                    let refused = unsafe {
                        let mut stat: libc::statx = std::mem::zeroed();
                        libc::statx(0, c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_SIZE, &mut stat)
                    };
                    assert_eq!(refused, -1, "the filter did not refuse statx");
                    file.size_and_links().map_err(|error| error.to_string())
                })
                .join()
                .unwrap()
        });
        std::fs::remove_file(&path).unwrap();
        assert_eq!(answer, Ok((300, 1)));
    }

    #[test]
    fn a_listing_larger_than_one_getdents_buffer_names_every_entry_once() {
        let dir = std::env::temp_dir().join(format!("ftss-names-{}-{}", std::process::id(), random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        // About 200 bytes an entry: 2,000 of them take more than ten reads of the 32 KiB buffer.
        let mut made: Vec<OsString> =
            (0..2_000).map(|index| format!("{index:05}-{}", "n".repeat(180)).into()).collect();
        for name in &made {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.join("sub")).unwrap();
        made.push("sub".into());
        let mut listed = read_dir_names(&dir).unwrap();
        listed.sort();
        made.sort();
        assert_eq!(listed, made);
        assert!(read_dir_names(dir.join("missing")).is_err());
        assert!(read_dir_names(dir.join("sub").join("..").join(&made[0])).is_err(), "a file is not a directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
