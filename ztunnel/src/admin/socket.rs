//! The admin socket: a unix socket, mode 0600, where the admin routes that change the daemon
//! (`POST /logging`, `POST /quitquitquit`) are served. The TCP admin port is reachable by every
//! process in the node's network namespace, every host-network pod included; a file the
//! daemon's user alone may open is not.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the path: most likely another daemon.
    #[error(
        "{path}: another process is serving this socket (is another daemon running? set --{flag})"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// The setting that names it.
        flag: &'static str,
    },
    /// Something that is not a socket is in the way; it is never removed.
    #[error("{path}: exists and is not a socket; remove it or set --{flag}")]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// The setting that names it.
        flag: &'static str,
    },
    /// Creating, binding or securing the socket failed.
    #[error("{path}: {what}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        error: io::Error,
    },
}

/// The bound socket file; removed on drop unless another process has replaced it since.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the socket bound here.
    id: (u64, u64),
}

impl SocketFile {
    /// Takes charge of the socket file at `path` as it is now (a socket handed over by the
    /// daemon that bound it): removed when this is dropped.
    pub fn adopt(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Leaves the file in place (a successor serves on it now).
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the admin socket at `path`, mode 0600 (only the daemon's user may connect), creating
/// its directory (mode 0700) when missing. A socket left by a daemon that died is replaced; one
/// another process still answers on is not. The socket is bound under a private temporary name
/// and renamed into place, so it is never reachable with looser permissions.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    bind_for(path, "admin-socket")
}

/// [`bind`] for the socket that the setting `--<flag>` names.
pub fn bind_for(
    path: &Path,
    flag: &'static str,
) -> Result<(UnixListener, SocketFile), SocketError> {
    let err = |what, error| SocketError::Io {
        path: path.to_path_buf(),
        what,
        error,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err("creating its directory", e))?;
    remove_stale(path, flag)?;
    let private = dir.join(format!(".{flag}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| err("creating a private directory beside it", e))?;
    let bound = (|| {
        let tmp = private.join("s");
        let listener = UnixListener::bind(&tmp).map_err(|e| err("binding", e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err("setting mode 0600", e))?;
        std::fs::rename(&tmp, path).map_err(|e| err("moving into place", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err("setting non-blocking", e))?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| err("reading back", e))?;
        let file = SocketFile {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        };
        Ok((listener, file))
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// Removes a socket at `path` that nobody answers on; refuses anything else.
fn remove_stale(path: &Path, flag: &'static str) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(SocketError::Io {
                path: path.to_path_buf(),
                what: "checking for an old socket",
                error,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket {
            path: path.to_path_buf(),
            flag,
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(SocketError::InUse {
            path: path.to_path_buf(),
            flag,
        });
    }
    std::fs::remove_file(path).map_err(|error| SocketError::Io {
        path: path.to_path_buf(),
        what: "removing the socket a stopped daemon left",
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_with_mode_0600_replacing_a_stale_socket_and_removed_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/admin.sock");
        // A socket nobody listens on any more, as a killed daemon leaves it.
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        drop(UnixListener::bind(&path).expect("stale"));
        let (listener, file) = bind(&path).expect("bind");
        let meta = std::fs::symlink_metadata(&path).expect("meta");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A second daemon on the same path is refused while the first answers.
        assert!(matches!(bind(&path), Err(SocketError::InUse { .. })));
        // Nothing but the socket is left in the directory.
        let entries: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("read_dir")
            .collect();
        assert_eq!(entries.len(), 1);
        drop(listener);
        drop(file);
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn a_file_in_the_way_is_never_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        std::fs::write(&path, "data").expect("write");
        assert!(matches!(bind(&path), Err(SocketError::NotASocket { .. })));
        assert_eq!(std::fs::read_to_string(&path).expect("still there"), "data");
    }
}
