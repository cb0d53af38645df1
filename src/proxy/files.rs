//! What the proxy owns on disk is kept private: the spend log is never opened through a symbolic
//! link, a file tally finds looser than the mode it creates it with is tightened, and a state
//! directory that every local user may write to is refused.
//!
//! A world-writable state directory lets any local user put their own `keys.db` there (keys
//! they minted themselves) or replace it; a symbolic link in place of the spend log sends the
//! billing records wherever the link points, with that file's owner and mode.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// True for the error `open(2)` gives with `O_NOFOLLOW` when the path is a symbolic link.
pub fn is_symlink_refusal(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Narrows an open file's permissions to at most `mode` (e.g. a spend log found `0644` becomes
/// `0640`), with a warning; a file already as tight is left alone. A file tally cannot change
/// (not its owner) is warned about only.
pub fn tighten(file: &File, path: &Path, mode: u32) {
    let Ok(metadata) = file.metadata() else {
        return;
    };
    let current = metadata.permissions().mode() & 0o7777;
    if current & !mode == 0 {
        return;
    }
    let tightened = current & mode;
    match file.set_permissions(std::fs::Permissions::from_mode(tightened)) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            "{} was mode {current:o}, more open than tally creates it ({mode:o}); it is now {tightened:o}",
            path.display()
        ),
        Err(e) => tracing::warn!(
            path = %path.display(),
            error = %e,
            "{} is mode {current:o}, more open than tally creates it ({mode:o}), and could not be \
             changed; run chmod {tightened:o} on it",
            path.display()
        ),
    }
}

/// A directory every local user may write to.
#[derive(Debug, thiserror::Error)]
#[error(
    "state directory {path} is writable by every local user (mode {mode:o}): anyone could replace \
     the key store in it; run `chmod o-w {path}` (tally creates it 0750), or set \
     tally_settings.state_dir / TALLY_STATE_DIR to a directory only tally's user and group can write"
)]
pub struct WorldWritable {
    pub path: String,
    pub mode: u32,
}

/// Refuses a state directory that others may write to (sticky or not: a sticky `/tmp` still
/// lets anyone create the key store before tally does).
pub fn refuse_world_writable(dir: &Path) -> Result<(), WorldWritable> {
    let Ok(metadata) = std::fs::metadata(dir) else {
        return Ok(()); // the caller's open reports a missing directory
    };
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(WorldWritable {
            path: dir.display().to_string(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn looser_files_are_tightened_and_tight_ones_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(0o666))
            .unwrap();
        tighten(&file, &path, 0o640);
        assert_eq!(mode(&path), 0o640);
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap();
        tighten(&file, &path, 0o640);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_world_writable_directory_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        refuse_world_writable(dir.path()).unwrap();
        for loose in [0o777, 0o1777, 0o702] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(loose)).unwrap();
            let e = refuse_world_writable(dir.path()).unwrap_err().to_string();
            assert!(
                e.contains("chmod o-w") && e.contains(&format!("{loose:o}")),
                "{e}"
            );
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        refuse_world_writable(dir.path()).unwrap();
    }
}
