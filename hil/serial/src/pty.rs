//! A pseudo-terminal for the virtual board: the board holds the master side, the runner (and
//! espflash) open the slave path like any serial port.
//!
//! A pty has no DTR/RTS lines (the ioctls fail with ENOTTY), so nothing on it can reset the
//! board; the virtual board takes reset and power commands on a control socket instead
//! ([`crate::reset`]).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

/// An open pty pair.
pub struct Pty {
    master: File,
    /// Kept open so the master never sees a hang-up between two users of the slave.
    _slave: OwnedFd,
    path: PathBuf,
}

impl Pty {
    /// Open a pty in raw mode (no echo, no line editing, no CR/LF translation: the ROM loader
    /// protocol is binary).
    pub fn open() -> std::io::Result<Pty> {
        let pair = nix::pty::openpty(None, None)?;
        let mut t = tcgetattr(&pair.slave)?;
        cfmakeraw(&mut t);
        tcsetattr(&pair.slave, SetArg::TCSANOW, &t)?;
        let path = nix::unistd::ttyname(&pair.slave)?;
        Ok(Pty {
            master: File::from(pair.master),
            _slave: pair.slave,
            path,
        })
    }

    /// The slave's path (`/dev/pts/N`), what a user passes as `--port`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The board's side of the line.
    pub fn master(&self) -> std::io::Result<File> {
        self.master.try_clone()
    }
}
