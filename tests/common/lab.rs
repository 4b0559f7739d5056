//! The lab: real kernels in QEMU guests (TCG) mounting the volume with the kernel's own NFS and SMB
//! clients, against real servers on the host (nfs-ganesha, smbd) bound to loopback.
//!
//! A guest boots Debian's cloud kernel with a busybox initramfs (`tests/lab/build.sh`, cached under
//! `target/lab/`), runs one job script (`tests/lab/lib.sh` + the test's script, appended to the
//! initramfs as a second archive), prints `LAB-EXIT <status>` and powers off.
//!
//! Networking cannot leak: `-nic user,restrict=on` lets a guest reach only the `guestfwd` ports
//! (NFS at 10.0.2.100:2049 and SMB at 10.0.2.101:445, each forwarded to the test's server on the
//! host's loopback); any other packet dies inside qemu.
//!
//! Lab tests in one binary run one guest at a time (two cores, TCG).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::{Proc, TempDir, wait_until};

/// Where a guest sees the host's NFS server (forwarded to the test's ganesha).
pub const NFS_SERVER: &str = "10.0.2.100";
/// Where a guest sees the host's SMB server (forwarded to the test's smbd).
pub const SMB_SERVER: &str = "10.0.2.101";
/// Where a job mounts the volume inside its root.
pub const GUEST_VOLUME: &str = "/mnt/ftss";

/// How long a guest that has printed its job's status may take to power off before it is killed.
const POWER_OFF_GRACE: Duration = Duration::from_secs(20);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Serializes lab tests of one binary (each boots guests and servers on fixed guest ports).
pub fn exclusive() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The kernel and base initramfs, built once per checkout.
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

pub fn boot_files() -> &'static BootFiles {
    static FILES: OnceLock<BootFiles> = OnceLock::new();
    FILES.get_or_init(|| {
        for program in ["qemu-system-x86_64", "cpio", "ganesha.nfsd", "smbd", "socat"] {
            assert!(super::have(program), "{program} is not installed (bash .ci/run installs the lab's packages)");
        }
        let out = repo_dir().join("target/lab");
        let output = Command::new("bash").arg(repo_dir().join("tests/lab/build.sh")).arg(&out).output().unwrap();
        assert!(
            output.status.success(),
            "tests/lab/build.sh failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        BootFiles { kernel: out.join("vmlinuz"), initramfs: out.join("initramfs.cpio.gz") }
    })
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How the test's ganesha caches what changes behind its back (files ftss-server writes directly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaneshaCache {
    /// ganesha's defaults (attributes and directory entries cached for 60 s).
    Default,
    /// The settings the README requires when ftss-server writes the export's directory directly.
    Off,
}

/// nfs-ganesha on the host's loopback, NFSv4.1/4.2 only: the volume as `/vol` (read-write) and the
/// host's `/` as `/host` (read-only, the guests' programs).
pub struct Ganesha {
    pub dir: TempDir,
    pub port: u16,
    process: Option<Proc>,
    config: PathBuf,
}

impl Ganesha {
    pub fn start(volume: &Path, cache: GaneshaCache) -> Ganesha {
        Ganesha::start_with(volume, cache, false)
    }

    /// With `grace`, a restarted server holds a grace period in which clients reclaim their open
    /// files (without it, as in [`Ganesha::start`], a restart makes their opens stale).
    pub fn start_with(volume: &Path, cache: GaneshaCache, grace: bool) -> Ganesha {
        let dir = TempDir::new("ganesha");
        let port = free_tcp_port();
        let root = dir.0.clone();
        std::fs::create_dir_all(root.join("recovery")).unwrap();
        let cache_settings = match cache {
            GaneshaCache::Default => "",
            GaneshaCache::Off => "    Attr_Expiration_Time = 0;\n",
        };
        let mdcache = match cache {
            GaneshaCache::Default => "",
            GaneshaCache::Off => "MDCACHE { Dir_Chunk = 0; }\n",
        };
        let config = root.join("ganesha.conf");
        std::fs::write(
            &config,
            format!(
                "NFS_CORE_PARAM {{\n    NFS_Port = {port};\n    Bind_addr = 127.0.0.1;\n    Protocols = 4;\n    \
                 Enable_NLM = false;\n    Enable_RQUOTA = false;\n}}\n\
                 NFSV4 {{\n    {grace}\n    RecoveryBackend = fs;\n    RecoveryRoot = \"{r}/recovery\";\n    \
                 Minor_Versions = 1, 2;\n}}\n{mdcache}\
                 EXPORT {{\n    Export_Id = 1;\n    Path = \"{vol}\";\n    Pseudo = /vol;\n    Access_Type = RW;\n    \
                 Squash = No_Root_Squash;\n    SecType = sys;\n    Transports = TCP;\n{cache_settings}    \
                 FSAL {{ Name = VFS; }}\n}}\n\
                 EXPORT {{\n    Export_Id = 2;\n    Path = \"/\";\n    Pseudo = /host;\n    Access_Type = RO;\n    \
                 Squash = No_Root_Squash;\n    SecType = sys;\n    Transports = TCP;\n    FSAL {{ Name = VFS; }}\n}}\n\
                 LOG {{\n    Default_Log_Level = WARN;\n}}\n",
                r = root.display(),
                vol = volume.display(),
                grace = if grace {
                    "Graceless = false;\n    Grace_Period = 15;\n    Lease_Lifetime = 10;"
                } else {
                    "Graceless = true;"
                },
            ),
        )
        .unwrap();
        let mut ganesha = Ganesha { dir, port, process: None, config };
        ganesha.restart();
        ganesha
    }

    /// Starts (or starts again) the server; waits until it listens.
    pub fn restart(&mut self) {
        self.kill();
        let root = &self.dir.0;
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&self.config)
            .arg("-L")
            .arg(root.join("ganesha.log"))
            .arg("-p")
            .arg(root.join("ganesha.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ganesha.nfsd");
        self.process = Some(Proc { child, name: "ganesha".into() });
        let port = self.port;
        let up = wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "ganesha did not listen on {port}: {}", self.log());
    }

    /// kill -9 of the NFS server.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("ganesha.log")).unwrap_or_default()
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Samba's smbd on the host's loopback (its own port), the volume as the guest share `vol`, with
/// `strict sync` so a client's fsync reaches the disk.
pub struct Smbd {
    pub dir: TempDir,
    pub port: u16,
    config: PathBuf,
}

impl Smbd {
    pub fn start(volume: &Path) -> Smbd {
        let dir = TempDir::new("smbd");
        let root = dir.0.clone();
        for sub in ["private", "lock", "state", "cache", "pid"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let port = free_tcp_port();
        let config = root.join("smb.conf");
        std::fs::write(
            &config,
            format!(
                "[global]\n  interfaces = lo\n  bind interfaces only = yes\n  smb ports = {port}\n  \
                 private dir = {r}/private\n  lock directory = {r}/lock\n  state directory = {r}/state\n  \
                 cache directory = {r}/cache\n  pid directory = {r}/pid\n  log file = {r}/smbd.log\n  \
                 map to guest = Bad User\n  server role = standalone server\n  load printers = no\n  \
                 disable spoolss = yes\n  server min protocol = SMB3_00\n\
                 [vol]\n  path = {vol}\n  guest ok = yes\n  read only = no\n  force user = root\n  \
                 strict sync = yes\n",
                r = root.display(),
                vol = volume.display(),
            ),
        )
        .unwrap();
        let smbd = Smbd { dir, port, config };
        let status = Command::new("smbd").arg("-D").arg("-s").arg(&smbd.config).stderr(Stdio::null()).status().unwrap();
        assert!(status.success(), "smbd failed to start");
        let up = wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "smbd did not listen on {port}");
        smbd
    }
}

impl Drop for Smbd {
    fn drop(&mut self) {
        let pattern = format!("smbd -D -s {}", self.config.display());
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(&pattern).status();
    }
}

/// What a guest boots with.
pub struct GuestSpec<'a> {
    /// Host name, also the tag of its files.
    pub name: &'a str,
    /// The job: shell (busybox sh) run after `tests/lab/lib.sh`; `VOLUME` is set to [`GUEST_VOLUME`].
    pub script: String,
    /// The host's ganesha port the guest's NFS traffic is forwarded to.
    pub nfs_port: Option<u16>,
    /// The host's smbd port the guest's SMB traffic is forwarded to.
    pub smb_port: Option<u16>,
    pub memory_mib: u32,
    /// More kernel command line (e.g. `memmap=64M!512M` for a pmem region).
    pub cmdline: String,
    /// More qemu arguments (disks, a second network).
    pub qemu_args: Vec<String>,
}

/// A second network between guests only: qemu's socket backend as UDP datagrams on loopback, this
/// guest at `local`, its peer at `remote` (the peer passes the same two ports swapped). The guest
/// sees it as eth1; no packet leaves qemu for anywhere but the peer's loopback port, and either
/// side can be killed and booted again (nothing to reconnect).
pub fn guest_link(local: u16, remote: u16) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!("socket,id=lab1,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}"),
        "-device".into(),
        "virtio-net-pci,netdev=lab1,id=nic1".into(),
    ]
}

/// A raw disk of `mib` MiB for a guest (`-drive`), created in `dir`.
pub fn guest_disk(dir: &Path, name: &str, mib: u64) -> Vec<String> {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(mib << 20).unwrap();
    existing_disk(&path)
}

/// A disk that already exists (a guest booted again keeps its disks).
pub fn existing_disk(path: &Path) -> Vec<String> {
    vec!["-drive".into(), format!("file={},format=raw,if=virtio,cache=none", path.display())]
}

/// A non-volatile DIMM of `mib` MiB backed by a file (made if missing), with a label area: the
/// guest makes it an fsdax namespace once (`ndctl create-namespace`), /dev/pmem0, which dax users
/// such as dm-writecache need (a label-less NVDIMM is a raw namespace, without dax).
/// Its stores land in the host's page cache through a shared mapping, so they outlive a kill -9 of
/// qemu, as a battery-backed write cache outlives a power cut. `memory_mib` must be the guest's
/// memory size.
pub fn nvdimm(path: &Path, mib: u64, memory_mib: u32) -> Vec<String> {
    // The label area comes out of the end, and the namespace must stay a multiple of 16 MiB.
    let bytes = (mib << 20) + (128 << 10);
    if !path.exists() {
        std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
    }
    vec![
        "-machine".into(),
        "pc,nvdimm=on".into(),
        "-m".into(),
        format!("{memory_mib}M,slots=2,maxmem={}M", memory_mib as u64 + mib + 1025),
        "-object".into(),
        format!("memory-backend-file,id=nv0,share=on,mem-path={},size={bytes}", path.display()),
        "-device".into(),
        "nvdimm,memdev=nv0,id=nvdimm0,label-size=128K".into(),
    ]
}

/// What a guest's connection to a forwarded port is handed to: a `socat` started for each
/// connection (a `tcp:` target would be one connection made when qemu starts, never made again
/// once the server restarts).
fn forwarder(port: u16) -> String {
    format!("cmd:socat - TCP:127.0.0.1:{port},,nodelay")
}

/// A running guest; killed -9 on drop.
pub struct Guest {
    pub dir: TempDir,
    process: Option<Proc>,
    console: PathBuf,
}

impl Guest {
    pub fn boot(spec: &GuestSpec) -> Guest {
        let files = boot_files();
        let dir = TempDir::new(&format!("guest-{}", spec.name));
        let job = dir.0.join("job");
        std::fs::create_dir_all(&job).unwrap();
        let lib = std::fs::read_to_string(repo_dir().join("tests/lab/lib.sh")).unwrap();
        std::fs::write(job.join("run.sh"), format!("VOLUME={GUEST_VOLUME}\n{lib}\n{}\n", spec.script)).unwrap();
        let archive = Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find job | cpio -o -H newc --quiet | gzip -1")
            .arg("sh")
            .arg(&dir.0)
            .output()
            .unwrap();
        assert!(archive.status.success(), "cpio failed: {}", String::from_utf8_lossy(&archive.stderr));
        let initrd = dir.0.join("initrd.cpio.gz");
        let mut file = std::fs::File::create(&initrd).unwrap();
        file.write_all(&std::fs::read(&files.initramfs).unwrap()).unwrap();
        file.write_all(&archive.stdout).unwrap();
        drop(file);

        let mut nic = String::from("user,id=net0,restrict=on");
        if let Some(port) = spec.nfs_port {
            nic.push_str(&format!(",guestfwd=tcp:{NFS_SERVER}:2049-{}", forwarder(port)));
        }
        if let Some(port) = spec.smb_port {
            nic.push_str(&format!(",guestfwd=tcp:{SMB_SERVER}:445-{}", forwarder(port)));
        }
        let console = dir.0.join("console.log");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", &spec.memory_mib.to_string(), "-smp", "1"])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-kernel")
            .arg(&files.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet lab.name={} lab.ip=10.0.2.15/24 lab.gw=10.0.2.2 {}",
                spec.name, spec.cmdline
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-netdev", &nic, "-device", "virtio-net-pci,netdev=net0,id=nic0"])
            .args(&spec.qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("qemu.stderr")).unwrap())
            .spawn()
            .expect("start qemu-system-x86_64");
        Guest { dir, process: Some(Proc { child, name: format!("guest {}", spec.name) }), console }
    }

    /// Everything the guest printed on its console so far (CR LF turned into LF).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).replace('\r', "")
    }

    /// Lines of the console that start with `prefix` (the prefix removed).
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.console().lines().filter_map(|line| line.strip_prefix(prefix).map(str::to_string)).collect()
    }

    /// Waits until the console shows `text` (or the guest stops, or `limit` passes).
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.console().contains(text) {
                return true;
            }
            if !self.running() {
                return self.console().contains(text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|process| matches!(process.child.try_wait(), Ok(None)))
    }

    /// Waits for the job to end and returns its exit status (`None` when it did not finish within
    /// `limit`). The guest prints the status after its `sync`, so the status is final once printed:
    /// a guest that then hangs powering off (a TCG guest starved of CPU can stall in a soft lockup
    /// there) is given a grace period and killed.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let status = |guest: &Guest| -> Option<i32> {
            guest.lines("LAB-EXIT ").last().and_then(|status| status.trim().parse().ok())
        };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline && self.running() && status(self).is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(mut process) = self.process.take() {
            process.wait_exit(POWER_OFF_GRACE);
        }
        status(self)
    }

    /// kill -9 of the whole machine (power loss).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}
