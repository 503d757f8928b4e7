//! `--workdir DIR`: each item runs in a fresh directory of its own, `DIR/<work_id>`, removed when the
//! item is done unless `--keep-workdir`.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Workdirs {
    root: PathBuf,
    keep: bool,
}

impl Workdirs {
    /// Creates `root` if needed; the worker refuses to start when it cannot.
    pub fn new(root: PathBuf, keep: bool) -> crate::Result<Workdirs> {
        std::fs::create_dir_all(&root).map_err(|e| {
            crate::Error::config(format!("cannot create --workdir {}: {e}", root.display()))
        })?;
        // Absolute, so that PROGRAM's view does not depend on the worker's own directory.
        let root = std::fs::canonicalize(&root).map_err(|e| {
            crate::Error::config(format!("cannot resolve --workdir {}: {e}", root.display()))
        })?;
        Ok(Workdirs { root, keep })
    }

    /// The directory the items' directories are made in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, work_id: &str) -> PathBuf {
        // The claim loop takes no other: a directory that is removed whole must not be named by
        // the server.
        assert!(
            crate::claim::is_plain_name(work_id),
            "work ids are plain names"
        );
        self.root.join(work_id)
    }

    /// A fresh, empty directory for the item: whatever an earlier run of the same item (a lease that
    /// expired, a kept directory) left there is removed first.
    pub fn prepare(&self, work_id: &str) -> io::Result<PathBuf> {
        let dir = self.path(work_id);
        remove(&dir)
            .and_then(|()| std::fs::create_dir(&dir))
            .map_err(|e| naming(&dir, e))?;
        Ok(dir)
    }

    /// Removes the item's directory unless the directories are kept. Returns what went wrong, if
    /// anything, for the log.
    pub fn finish(&self, work_id: &str) -> io::Result<()> {
        if self.keep {
            return Ok(());
        }
        let dir = self.path(work_id);
        remove(&dir).map_err(|e| naming(&dir, e))
    }
}

/// Removes `dir` and what it holds; nothing to do when it is not there, its parent included (a
/// `--workdir` replaced by a file while the worker ran: the item's directory was never made).
fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// `e` with the path it is about: the operating system's words alone ("Not a directory") do not say
/// which, and they end up in the item's `tether.error`.
fn naming(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_that_became_a_file_is_named_in_the_error_and_leaves_nothing_to_remove() {
        let root = tempfile::tempdir().unwrap();
        let items = root.path().join("items");
        let dirs = Workdirs::new(items.clone(), false).unwrap();
        std::fs::remove_dir(&items).unwrap();
        std::fs::write(&items, "not a directory").unwrap();
        let error = dirs.prepare("work_1").unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&items.join("work_1").display().to_string()),
            "{error}"
        );
        dirs.finish("work_1")
            .expect("nothing was made, nothing to remove");
    }

    #[test]
    fn each_item_gets_a_fresh_directory_that_goes_away_unless_kept() {
        let root = tempfile::tempdir().unwrap();
        let dirs = Workdirs::new(root.path().join("items"), false).unwrap();
        let dir = dirs.prepare("work_1").unwrap();
        std::fs::write(dir.join("leftover"), "x").unwrap();
        let again = dirs.prepare("work_1").unwrap();
        assert_eq!(dir, again);
        assert!(
            !again.join("leftover").exists(),
            "a second run starts empty"
        );
        dirs.finish("work_1").unwrap();
        assert!(!dir.exists());
        dirs.finish("work_1").unwrap();

        let kept = Workdirs::new(root.path().join("kept"), true).unwrap();
        let dir = kept.prepare("work_2").unwrap();
        kept.finish("work_2").unwrap();
        assert!(dir.exists());
    }
}
