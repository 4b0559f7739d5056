//! A real SMB volume for tests: Samba's `smbd` in userspace on loopback (port 445, guest share,
//! private config and state under a temp dir) and `smbnetfs` (FUSE, libsmbclient) mounting it.
//! SMB tests in one binary run one at a time (they share port 445).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{TempDir, wait_until};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct SmbShare {
    pub dir: TempDir,
    /// The share's directory on the "array" (where ftss-server runs).
    pub local: PathBuf,
    /// The share as nodes see it, through the smbnetfs mount.
    pub mounted: PathBuf,
    mount_point: PathBuf,
    config: PathBuf,
    _guard: MutexGuard<'static, ()>,
}

impl SmbShare {
    pub fn start(tag: &str) -> SmbShare {
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for program in ["smbd", "smbnetfs", "fusermount"] {
            assert!(super::have(program), "{program} is not installed (bash .ci/run installs samba and smbnetfs)");
        }
        let dir = TempDir::new(tag);
        let root = dir.0.clone();
        for sub in ["share", "private", "lock", "state", "cache", "pid", "mnt", "home/.smb"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let config = root.join("smb.conf");
        std::fs::write(
            &config,
            format!(
                "[global]\n  interfaces = lo\n  bind interfaces only = yes\n  private dir = {r}/private\n  \
                 lock directory = {r}/lock\n  state directory = {r}/state\n  cache directory = {r}/cache\n  \
                 pid directory = {r}/pid\n  log file = {r}/smbd.log\n  map to guest = Bad User\n  \
                 server role = standalone server\n  load printers = no\n  disable spoolss = yes\n  \
                 server min protocol = SMB2\n[ftss]\n  path = {r}/share\n  guest ok = yes\n  read only = no\n  \
                 force user = root\n",
                r = root.display()
            ),
        )
        .unwrap();
        let smbnetfs_config = root.join("home/.smb/smbnetfs.conf");
        std::fs::write(
            &smbnetfs_config,
            format!(
                "auth \"guest\" \"\"\nhost 127.0.0.1 visible=true\nsmb_query_browsers \"false\"\nlog_file \"{}/smbnetfs.log\"\n",
                root.display()
            ),
        )
        .unwrap();
        // smbnetfs refuses a config file other users could read.
        Command::new("chmod").arg("600").arg(&smbnetfs_config).status().unwrap();
        let share = SmbShare {
            local: root.join("share"),
            mounted: root.join("mnt/127.0.0.1/ftss"),
            mount_point: root.join("mnt"),
            config,
            dir,
            _guard: guard,
        };
        share.start_smbd();
        let status = Command::new("smbnetfs").arg(&share.mount_point).env("HOME", root.join("home")).status().unwrap();
        assert!(status.success(), "smbnetfs failed to mount");
        let probe = share.mounted.join(".probe");
        let mounted = wait_until(Duration::from_secs(30), || std::fs::write(&probe, b"x").is_ok());
        assert!(mounted, "the SMB share did not become writable through smbnetfs");
        let _ = std::fs::remove_file(&probe);
        share
    }

    pub fn start_smbd(&self) {
        let status = Command::new("smbd").arg("-D").arg("-s").arg(&self.config).stderr(Stdio::null()).status().unwrap();
        assert!(status.success(), "smbd failed to start");
        let listening = wait_until(Duration::from_secs(10), || std::net::TcpStream::connect("127.0.0.1:445").is_ok());
        assert!(listening, "smbd is not listening on 127.0.0.1:445");
    }

    /// kill -9 of every smbd process of this share (the parent and its per-client children).
    pub fn kill_smbd(&self) {
        let pattern = format!("smbd -D -s {}", self.config.display());
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(&pattern).status();
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect("127.0.0.1:445").is_err());
        let _ = std::fs::remove_file(self.dir.0.join("pid/smbd.pid"));
    }
}

impl Drop for SmbShare {
    fn drop(&mut self) {
        let _ = Command::new("fusermount").arg("-u").arg("-z").arg(&self.mount_point).status();
        self.kill_smbd();
    }
}
