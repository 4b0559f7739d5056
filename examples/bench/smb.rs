//! An SMB share for the `ftss-smb` and `smb-file-per-packet` scenarios: a private `smbd` on
//! loopback (port 445, guest share) mounted with `smbnetfs` over FUSE, as docs/NOTES describe.
//! The server side (ftss-server) uses the share's directory directly, as it would on the array;
//! the nodes use the mount.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::have;

/// The share's name in smb.conf and in the mount's path.
const SHARE: &str = "ftss";
/// smbnetfs reaches hosts on the standard SMB port only.
const SMB_PORT: u16 = 445;
/// How long the mount may take to show the share.
const MOUNT_LIMIT: Duration = Duration::from_secs(15);

/// A running smbd and a smbnetfs mount of its share; both stopped on drop.
pub struct SmbShare {
    root: PathBuf,
    mount: PathBuf,
    /// The share's directory as the array sees it (local).
    pub local: PathBuf,
    /// The same directory through smbd and the smbnetfs mount.
    pub mounted: PathBuf,
}

/// The FUSE unmount helper smbnetfs's libfuse installed (fuse 2 or fuse 3).
fn fusermount() -> Option<&'static str> {
    ["fusermount", "fusermount3"].into_iter().find(|program| have(program))
}

/// Why SMB scenarios cannot run here, or `None` if they can.
pub fn unavailable() -> Option<String> {
    for program in ["smbd", "smbnetfs"] {
        if !have(program) && !have(&format!("/usr/sbin/{program}")) {
            return Some(format!(
                "{program} not installed (apt-get install samba smbnetfs fuse to run the SMB scenarios)"
            ));
        }
    }
    if fusermount().is_none() {
        return Some("neither fusermount nor fusermount3 is installed (apt-get install fuse)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing (no FUSE in this kernel or container)".into());
    }
    if std::net::TcpStream::connect(("127.0.0.1", SMB_PORT)).is_ok() {
        return Some(format!("port {SMB_PORT} on loopback is already taken by another SMB server"));
    }
    None
}

fn smbd_config(root: &Path, share: &Path) -> String {
    let dir = |name: &str| root.join(name).display().to_string();
    format!(
        "[global]\n  interfaces = lo\n  bind interfaces only = yes\n  smb ports = {SMB_PORT}\n  \
         private dir = {}\n  lock directory = {}\n  state directory = {}\n  cache directory = {}\n  \
         pid directory = {}\n  log file = {}\n  map to guest = Bad User\n  guest account = root\n  \
         load printers = no\n  disable spoolss = yes\n[{SHARE}]\n  path = {}\n  guest ok = yes\n  \
         read only = no\n  force user = root\n",
        dir("private"),
        dir("lock"),
        dir("state"),
        dir("cache"),
        dir("pid"),
        dir("smbd.log"),
        share.display()
    )
}

impl SmbShare {
    pub fn start(root: &Path) -> Result<SmbShare, String> {
        let io = |error: std::io::Error| error.to_string();
        let local = root.join("share");
        let mount = root.join("mnt");
        let home = root.join("home");
        for name in ["private", "lock", "state", "cache", "pid"] {
            std::fs::create_dir_all(root.join(name)).map_err(io)?;
        }
        for dir in [&local, &mount, &home.join(".smb")] {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let config = root.join("smb.conf");
        std::fs::write(&config, smbd_config(root, &local)).map_err(io)?;
        let mut share = SmbShare { root: root.to_path_buf(), mount: mount.clone(), local, mounted: PathBuf::new() };
        let status = Command::new("smbd").arg("-D").arg("-s").arg(&config).status().map_err(io)?;
        if !status.success() {
            return Err(format!("smbd failed to start (see {})", root.join("smbd.log").display()));
        }
        // smbnetfs refuses a config file that others can read.
        let netfs_config = home.join(".smb/smbnetfs.conf");
        std::fs::write(&netfs_config, "auth \"guest\" \"\"\nhost 127.0.0.1 visible=true\n").map_err(io)?;
        std::fs::write(home.join(".smb/smb.conf"), "[global]\n").map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&netfs_config, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let status = Command::new("smbnetfs")
            .arg(&mount)
            // fuse 2 splits writes into 4 KiB requests (each an SMB round trip) unless told
            // otherwise; any operator mounting smbnetfs for bulk data would set this.
            .args(["-o", "big_writes,max_write=131072"])
            .env("HOME", &home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(io)?;
        if !status.success() {
            return Err("smbnetfs failed to mount".into());
        }
        share.mounted = mount.join("127.0.0.1").join(SHARE);
        let started = Instant::now();
        while std::fs::read_dir(&share.mounted).is_err() {
            if started.elapsed() > MOUNT_LIMIT {
                return Err(format!("{} did not appear through smbnetfs", share.mounted.display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(share)
    }
}

impl Drop for SmbShare {
    fn drop(&mut self) {
        if let Some(fusermount) = fusermount() {
            let _ = Command::new(fusermount).arg("-u").arg(&self.mount).stderr(Stdio::null()).status();
        }
        let pid_file = self.root.join("pid").join("smbd.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|text| text.trim().parse::<i32>().ok()) {
            // SAFETY: signalling the smbd this bench started (its pid file is in our directory).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}
