//! A real GlusterFS volume for tests: glusterd (started if not running), a replica-3 volume of three
//! bricks in temporary directories, mounted with the FUSE client. Each test makes a uniquely named
//! volume and removes it afterwards (gluster keeps its state in /var/lib/glusterd).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{TempDir, wait_until};

/// Volume operations go through one glusterd: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct GlusterVolume {
    pub name: String,
    pub dir: TempDir,
    pub mount: PathBuf,
    bricks: Vec<PathBuf>,
    _guard: MutexGuard<'static, ()>,
}

fn gluster(args: &[&str]) -> Result<String, String> {
    let output = Command::new("gluster")
        .arg("--mode=script")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| error.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(text) }
}

fn hostname() -> String {
    String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap().trim().to_owned()
}

impl GlusterVolume {
    pub fn create(tag: &str) -> GlusterVolume {
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for program in ["glusterd", "gluster", "mount.glusterfs"] {
            assert!(super::have(program), "{program} is not installed (bash .ci/run installs glusterfs-server)");
        }
        if gluster(&["volume", "list"]).is_err() {
            let _ = Command::new("glusterd").status();
            assert!(
                wait_until(Duration::from_secs(30), || gluster(&["volume", "list"]).is_ok()),
                "glusterd did not start"
            );
        }
        let dir = TempDir::new(tag);
        let name = format!("ftss{}{}", tag.replace(|c: char| !c.is_ascii_alphanumeric(), ""), std::process::id());
        let host = hostname();
        let bricks: Vec<PathBuf> = (1..=3).map(|index| dir.0.join(format!("brick{index}"))).collect();
        let mut create = vec!["volume".to_string(), "create".into(), name.clone(), "replica".into(), "3".into()];
        for brick in &bricks {
            std::fs::create_dir_all(brick).unwrap();
            create.push(format!("{host}:{}", brick.display()));
        }
        create.push("force".into());
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        gluster(&create).unwrap_or_else(|error| panic!("gluster volume create: {error}"));
        gluster(&["volume", "start", &name]).unwrap_or_else(|error| panic!("gluster volume start: {error}"));
        let mount = dir.0.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let source = format!("{host}:/{name}");
        let mounted = wait_until(Duration::from_secs(60), || {
            Command::new("mount")
                .args(["-t", "glusterfs", &source])
                .arg(&mount)
                .status()
                .is_ok_and(|status| status.success())
        });
        assert!(mounted, "mount -t glusterfs {source} failed");
        GlusterVolume { name, dir, mount, bricks, _guard: guard }
    }

    /// The pids of this volume's brick processes.
    pub fn brick_pids(&self) -> Vec<u32> {
        let output = Command::new("pgrep").args(["-f", &format!("glusterfsd.*{}", self.name)]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).lines().filter_map(|line| line.trim().parse().ok()).collect()
    }

    /// kill -9 of one brick process.
    pub fn kill_brick(&self) -> u32 {
        let pids = self.brick_pids();
        assert_eq!(pids.len(), 3, "expected three brick processes, found {pids:?}");
        // SAFETY: signalling a process we started through glusterd.
        unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
        pids[0]
    }

    /// `volume start NAME force`: restarts dead bricks; self-heal catches them up.
    pub fn restart_bricks(&self) {
        // glusterd notices a dead brick only after a moment; until then `start force` finds every
        // brick "running" and does nothing, so ask again until all three are there.
        let restarted = wait_until(Duration::from_secs(60), || {
            gluster(&["volume", "start", &self.name, "force"])
                .unwrap_or_else(|error| panic!("volume start force: {error}"));
            wait_until(Duration::from_secs(3), || self.brick_pids().len() == 3)
        });
        assert!(restarted, "bricks did not come back");
    }

    /// Starts a heal and waits until self-heal has nothing left to heal.
    pub fn wait_healed(&self, limit: Duration) -> bool {
        let _ = gluster(&["volume", "heal", &self.name]);
        wait_until(limit, || {
            gluster(&["volume", "heal", &self.name, "info"])
                .map(|text| {
                    text.lines()
                        .filter(|line| line.starts_with("Number of entries:"))
                        .all(|line| line.trim().ends_with(": 0"))
                })
                .unwrap_or(false)
        })
    }

    pub fn bricks(&self) -> &[PathBuf] {
        &self.bricks
    }
}

impl Drop for GlusterVolume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = gluster(&["volume", "stop", &self.name, "force"]);
        let _ = gluster(&["volume", "delete", &self.name]);
    }
}
