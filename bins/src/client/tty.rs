//! Terminal mode for interactive sessions: cbreak (no line buffering, no
//! echo, no CR to NL translation, no signals: Ctrl-C, Ctrl-Z and Ctrl-Backslash are
//! bytes for the session), restored on drop.

use std::io;

/// Whether file descriptor `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Keeps a terminal in cbreak mode while alive.
pub struct CbreakGuard {
    fd: i32,
    saved: libc::termios,
}

impl CbreakGuard {
    /// Puts terminal `fd` in cbreak mode.
    pub fn new(fd: i32) -> io::Result<CbreakGuard> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // No signals: Ctrl-C reaches the escape logic as a byte, in order
        // with the other keys.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
        // Enter sends a carriage return, as a serial terminal does.
        raw.c_iflag &= !libc::ICRNL;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CbreakGuard { fd, saved })
    }
}

impl Drop for CbreakGuard {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new`.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved);
        }
    }
}
