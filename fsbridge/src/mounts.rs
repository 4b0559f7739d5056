//! Is this path a volume ftss may write? The checks every writer makes before it trusts a
//! volume: it is the FTSS volume the server prepared (its marker is there, so an unmounted
//! mountpoint is not silently filled instead), and the file system it is on will not lose or
//! corrupt acknowledged writes by the way it is mounted.

use std::fs;
use std::path::{Path, PathBuf};

/// The file `ftss-server` writes at the top of a volume it prepared.
pub const VOLUME_MARKER: &str = "ftss-volume";

/// One line of `/proc/self/mountinfo`, as far as the checks need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount and per-superblock options together.
    pub options: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let octal = bytes.get(index + 1..index + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[index], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                index += 4;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of `/proc/self/mountinfo`; lines it cannot read are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let mut rest = after.split(' ');
            let fstype = rest.next()?.to_owned();
            let source = unescape(rest.next()?);
            let super_options = rest.next().unwrap_or("");
            let options =
                fields.get(5)?.split(',').chain(super_options.split(',')).map(str::to_owned).collect::<Vec<_>>();
            Some(Mount { mount_point: PathBuf::from(unescape(fields.get(4)?)), fstype, source, options })
        })
        .collect()
}

/// The mount `path` (absolute, symlinks resolved) lives on: the last listed mount whose mount
/// point is the longest prefix of it.
pub fn mount_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    let mut best: Option<&Mount> = None;
    for mount in mounts {
        let longer = best.is_none_or(|best| mount.mount_point.as_os_str().len() >= best.mount_point.as_os_str().len());
        if path.starts_with(&mount.mount_point) && longer {
            best = Some(mount);
        }
    }
    best
}

/// What is unsafe about mounting a volume this way (empty: nothing known).
pub fn mount_problems(mount: &Mount) -> Vec<String> {
    let has = |option: &str| mount.options.iter().any(|present| present == option);
    let mut problems = Vec::new();
    let nfs = mount.fstype == "nfs" || mount.fstype == "nfs4";
    if nfs && (has("soft") || has("softerr")) {
        problems.push(format!(
            "{} is a soft NFS mount ({}): a write that times out is given up while the server may still \
             apply part of it, which can corrupt files silently; mount it with `hard`",
            mount.mount_point.display(),
            mount.source
        ));
    }
    if (mount.fstype == "cifs" || mount.fstype == "smb3") && has("nostrictsync") {
        problems.push(format!(
            "{} is an SMB mount with `nostrictsync` ({}): fsync does not reach the server, so nothing \
             is durable when ftss says it is; remove `nostrictsync`",
            mount.mount_point.display(),
            mount.source
        ));
    }
    problems
}

/// Checks that `volume` is an FTSS volume on a safe mount; the reasons it is not.
pub fn check_volume(volume: &Path) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    match fs::metadata(volume.join(VOLUME_MARKER)) {
        Ok(meta) if meta.is_file() => {}
        _ => problems.push(format!(
            "{} has no {VOLUME_MARKER} marker: it is not a volume ftss-server prepared (is it mounted? \
             `ftss-server init --volume` or `run` writes the marker on the array)",
            volume.display()
        )),
    }
    let resolved = fs::canonicalize(volume).unwrap_or_else(|_| volume.to_path_buf());
    if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
        let mounts = parse_mountinfo(&text);
        if let Some(mount) = mount_of(&mounts, &resolved) {
            problems.extend(mount_problems(mount));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Writes the marker at the top of `volume` unless it is there (the server, preparing a volume).
pub fn write_marker(volume: &Path) -> std::io::Result<()> {
    let path = volume.join(VOLUME_MARKER);
    if crate::fsops::metadata(&path).is_ok_and(|meta| meta.is_file) {
        return Ok(());
    }
    let tmp = volume.join(format!(".{VOLUME_MARKER}.{}", std::process::id()));
    let text = "This directory is an FTSS volume (written by ftss-server; nodes refuse a volume without it).\n";
    crate::spool::write_file_durably(&tmp, text.as_bytes()).map_err(std::io::Error::other)?;
    crate::fsops::rename(&tmp, &path)?;
    crate::spool::sync_directory(volume).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /mnt/ftss rw,relatime shared:20 - nfs4 10.0.2.100:/vol rw,vers=4.2,soft,proto=tcp,timeo=600
41 22 0:36 / /mnt/smb\\040share rw,relatime - cifs //10.0.2.101/vol rw,vers=3.0,cache=strict,nostrictsync,soft
42 22 0:37 / /mnt/good rw,relatime - nfs 10.0.2.100:/vol rw,vers=3,hard,proto=tcp
";

    #[test]
    fn finds_the_mount_of_a_path_and_its_problems() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        let nfs = mount_of(&mounts, Path::new("/mnt/ftss/nodes")).unwrap();
        assert_eq!(nfs.fstype, "nfs4");
        let problems = mount_problems(nfs);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("soft NFS mount"), "{problems:?}");
        let smb = mount_of(&mounts, Path::new("/mnt/smb share")).unwrap();
        // cifs is `soft` by default: only nostrictsync is refused for SMB.
        let problems = mount_problems(smb);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("nostrictsync"), "{problems:?}");
        assert!(mount_problems(mount_of(&mounts, Path::new("/mnt/good/x")).unwrap()).is_empty());
        assert_eq!(mount_of(&mounts, Path::new("/srv")).unwrap().fstype, "ext4");
    }

    #[test]
    fn a_directory_without_the_marker_is_refused_and_with_it_accepted() {
        let dir =
            std::env::temp_dir().join(format!("fsbridge-marker-{}-{:x}", std::process::id(), crate::random_u64()));
        fs::create_dir_all(&dir).unwrap();
        let problems = check_volume(&dir).unwrap_err();
        assert!(problems[0].contains("no ftss-volume marker"), "{problems:?}");
        write_marker(&dir).unwrap();
        assert_eq!(check_volume(&dir), Ok(()));
        let _ = fs::remove_dir_all(&dir);
    }
}
