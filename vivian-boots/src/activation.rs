//! systemd socket activation by name (IN B.2).
//!
//! systemd (or `systemd-socket-activate`) passes sockets as file descriptors
//! 3, 4, ... with `LISTEN_PID` (must be our pid), `LISTEN_FDS` (the count)
//! and `LISTEN_FDNAMES` (colon-separated names, from `FileDescriptorName=`
//! or `--fdname=`). The environment is parsed once per process by the
//! `sd-listen-fds` crate; each socket can then be taken once, by name, with
//! a check of its type (stream for TCP listeners, datagram for UDP) so that
//! a unit file that swaps two names fails with an error naming the socket
//! instead of a confusing runtime failure.
//!
//! The REST API takes all its `http_ipv4` listeners with
//! [`listeners_named`]; the boot servers take the first `dhcp_ipv4` and
//! `tftp_ipv4` datagram sockets with [`udp_sockets_named`].

use std::net::{TcpListener, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::{Mutex, OnceLock};

use socket2::{Socket, Type};

/// Socket activation errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID`/`LISTEN_FDS` are set but not numbers.
    #[error("malformed socket activation environment (LISTEN_PID / LISTEN_FDS)")]
    MalformedEnv,
    /// A socket with that name has another type than the caller needs.
    #[error("socket-activated file descriptor {fd} named {name:?} is not a {expected} socket")]
    WrongType {
        /// The name asked for.
        name: String,
        /// The descriptor number.
        fd: i32,
        /// "stream" or "datagram".
        expected: &'static str,
    },
    /// A system call on an inherited descriptor failed.
    #[error("socket-activated file descriptor named {name:?}: {reason}")]
    Io {
        /// The name asked for.
        name: String,
        /// What failed.
        reason: String,
    },
}

type Inherited = Vec<(Option<String>, OwnedFd)>;

static INHERITED: OnceLock<Result<Mutex<Inherited>, ActivationError>> = OnceLock::new();

fn inherited() -> Result<&'static Mutex<Inherited>, ActivationError> {
    INHERITED
        .get_or_init(|| {
            sd_listen_fds::get()
                .map(|v| {
                    Mutex::new(
                        v.into_iter()
                            .map(|(name, fd)| (name, fd.into_std()))
                            .collect(),
                    )
                })
                .map_err(|_| ActivationError::MalformedEnv)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Names of the inherited sockets not taken yet (`None` = unnamed), in
/// descriptor order. Empty when the process was not socket-activated.
pub fn available_names() -> Result<Vec<Option<String>>, ActivationError> {
    let fds = inherited()?.lock().unwrap_or_else(|e| e.into_inner());
    Ok(fds.iter().map(|(n, _)| n.clone()).collect())
}

/// Takes every inherited socket named `name` whose type is `ty`.
fn take(name: &str, ty: Type, expected: &'static str) -> Result<Vec<Socket>, ActivationError> {
    use std::os::fd::AsRawFd;
    let mut fds = inherited()?.lock().unwrap_or_else(|e| e.into_inner());
    // Check every candidate before taking any: all or nothing.
    for (n, fd) in fds.iter() {
        if n.as_deref() == Some(name) {
            let sock = socket2::SockRef::from(fd);
            let t = sock.r#type().map_err(|e| ActivationError::Io {
                name: name.into(),
                reason: format!("SO_TYPE: {e}"),
            })?;
            if t != ty {
                return Err(ActivationError::WrongType {
                    name: name.into(),
                    fd: fd.as_raw_fd(),
                    expected,
                });
            }
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < fds.len() {
        if fds[i].0.as_deref() == Some(name) {
            let (_, fd) = fds.remove(i);
            let s = Socket::from(fd);
            s.set_cloexec(true).map_err(|e| ActivationError::Io {
                name: name.into(),
                reason: format!("FD_CLOEXEC: {e}"),
            })?;
            out.push(s);
        } else {
            i += 1;
        }
    }
    Ok(out)
}

/// Takes every inherited TCP listening socket named `name` (e.g.
/// `http_ipv4`), in blocking mode as systemd passes them. Empty when there
/// is none: the caller then binds its own. A second call for the same name
/// returns nothing (each socket is handed out once).
pub fn listeners_named(name: &str) -> Result<Vec<TcpListener>, ActivationError> {
    Ok(take(name, Type::STREAM, "stream")?
        .into_iter()
        .map(TcpListener::from)
        .collect())
}

/// Takes every inherited UDP socket named `name` (e.g. `dhcp_ipv4`).
pub fn udp_sockets_named(name: &str) -> Result<Vec<UdpSocket>, ActivationError> {
    Ok(take(name, Type::DGRAM, "datagram")?
        .into_iter()
        .map(UdpSocket::from)
        .collect())
}
