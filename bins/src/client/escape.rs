//! The interactive escape of EX C.5: Ctrl-A is an escape character.
//!
//! * Ctrl-A Ctrl-A sends one Ctrl-A;
//! * Ctrl-A followed by another key sends that key (the escape is dropped);
//! * Ctrl-C is forwarded as byte 0x03, unless it follows Ctrl-A, in which
//!   case the client quits with INCOMPLETE.
//!
//! The terminal is in cbreak mode without signals, so Ctrl-C arrives as a
//! byte, in order with the other keys ([`Escape::key`]); a SIGINT from
//! elsewhere goes through [`Escape::interrupt`] with the same rule.

/// Ctrl-A.
pub const CTRL_A: u8 = 0x01;
/// Ctrl-C.
pub const CTRL_C: u8 = 0x03;

/// What to do after a Ctrl-C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// Send byte 0x03 to the DUT.
    Forward,
    /// Quit the client (status INCOMPLETE).
    Quit,
}

/// What a key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// Send this byte to the DUT.
    Send(u8),
    /// Nothing yet (Ctrl-A armed the escape).
    Nothing,
    /// Quit the client (status INCOMPLETE).
    Quit,
}

/// The escape state of the keyboard.
#[derive(Debug, Default, Clone)]
pub struct Escape {
    armed: bool,
}

impl Escape {
    /// A fresh state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether Ctrl-A was just pressed.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// A key was typed: what to do.
    pub fn key(&mut self, byte: u8) -> Key {
        match byte {
            CTRL_A if self.armed => {
                self.armed = false;
                Key::Send(CTRL_A)
            }
            CTRL_A => {
                self.armed = true;
                Key::Nothing
            }
            CTRL_C => match self.interrupt() {
                Interrupt::Quit => Key::Quit,
                Interrupt::Forward => Key::Send(CTRL_C),
            },
            b => {
                self.armed = false;
                Key::Send(b)
            }
        }
    }

    /// Keys typed: the bytes to send, and whether the user asked to quit
    /// (the keys after the quit are dropped).
    pub fn keys(&mut self, bytes: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            match self.key(b) {
                Key::Send(b) => out.push(b),
                Key::Nothing => {}
                Key::Quit => return (out, true),
            }
        }
        (out, false)
    }

    /// Ctrl-C (SIGINT) was received.
    pub fn interrupt(&mut self) -> Interrupt {
        if std::mem::take(&mut self.armed) {
            Interrupt::Quit
        } else {
            Interrupt::Forward
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"abc", b"abc"),
            (b"\x01\x01", b"\x01"),
            (b"\x01\x01\x01", b"\x01"),
            (b"\x01\x01\x01\x01", b"\x01\x01"),
            (b"\x01x", b"x"),
            (b"a\x01", b"a"),
            (b"a\x03b", b"a\x03b"),
            (b"\x01\x01\x03", b"\x01\x03"),
        ];
        for (input, out) in cases {
            assert_eq!(
                Escape::new().keys(input),
                (out.to_vec(), false),
                "{input:?}"
            );
        }
        assert_eq!(
            Escape::new().keys(b"ls\x01\x03more"),
            (b"ls".to_vec(), true)
        );
    }

    #[test]
    fn interrupts() {
        let mut e = Escape::new();
        assert_eq!(e.interrupt(), Interrupt::Forward);
        e.key(CTRL_A);
        assert_eq!(e.interrupt(), Interrupt::Quit);
        assert_eq!(e.interrupt(), Interrupt::Forward);
        assert_eq!(e.key(CTRL_A), Key::Nothing);
        assert_eq!(e.key(b'x'), Key::Send(b'x'));
        assert_eq!(e.interrupt(), Interrupt::Forward);
    }
}
