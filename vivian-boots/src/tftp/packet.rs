//! TFTP wire format (RFC 1350, options of RFC 2347).

/// Opcodes.
pub mod opcode {
    /// Read request.
    pub const RRQ: u16 = 1;
    /// Write request.
    pub const WRQ: u16 = 2;
    /// Data block.
    pub const DATA: u16 = 3;
    /// Acknowledgement.
    pub const ACK: u16 = 4;
    /// Error.
    pub const ERROR: u16 = 5;
    /// Option acknowledgement (RFC 2347).
    pub const OACK: u16 = 6;
}

/// Error codes.
pub mod error_code {
    /// Not defined, see message.
    pub const UNDEFINED: u16 = 0;
    /// File not found.
    pub const FILE_NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS_VIOLATION: u16 = 2;
    /// Illegal TFTP operation.
    pub const ILLEGAL_OPERATION: u16 = 4;
    /// Unknown transfer id (the reference also uses it for bad modes).
    pub const UNKNOWN_TID: u16 = 5;
    /// Option negotiation refused (RFC 2347).
    pub const OPTION_REFUSED: u16 = 8;
}

/// Most options a request may carry; more are ignored.
pub const MAX_OPTIONS: usize = 16;

/// A parsed RRQ or WRQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// True for WRQ.
    pub write: bool,
    /// File name as sent (lossy UTF-8).
    pub filename: String,
    /// Transfer mode, lower-cased.
    pub mode: String,
    /// Options (names lower-cased), in the order sent.
    pub options: Vec<(String, String)>,
}

/// A packet a client sends during a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPacket {
    /// ACK of a block number.
    Ack(u16),
    /// ERROR: the client gives up.
    Error(u16),
    /// Anything else.
    Other,
}

/// Why a request was not parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Under 2 bytes.
    #[error("packet too short")]
    TooShort,
    /// Not RRQ or WRQ.
    #[error("opcode {0} is not a request")]
    NotARequest(u16),
    /// Missing NUL-terminated file name or mode.
    #[error("missing file name or mode")]
    MissingField,
}

/// Parses an RRQ/WRQ. Bounded: works on the received datagram only.
pub fn parse_request(buf: &[u8]) -> Result<Request, ParseError> {
    if buf.len() < 2 {
        return Err(ParseError::TooShort);
    }
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    if op != opcode::RRQ && op != opcode::WRQ {
        return Err(ParseError::NotARequest(op));
    }
    let mut fields = buf[2..].split(|b| *b == 0);
    let filename = fields.next().filter(|f| !f.is_empty());
    let mode = fields.next().filter(|f| !f.is_empty());
    let (Some(filename), Some(mode)) = (filename, mode) else {
        return Err(ParseError::MissingField);
    };
    // After the last NUL comes an empty (or unterminated) tail: only the
    // complete, NUL-terminated strings before it form options.
    let rest: Vec<&[u8]> = fields.collect();
    let complete = &rest[..rest.len().saturating_sub(1)];
    let options = complete
        .chunks_exact(2)
        .filter(|pair| !pair[0].is_empty())
        .take(MAX_OPTIONS)
        .map(|pair| {
            (
                String::from_utf8_lossy(pair[0]).to_ascii_lowercase(),
                String::from_utf8_lossy(pair[1]).into_owned(),
            )
        })
        .collect();
    Ok(Request {
        write: op == opcode::WRQ,
        filename: String::from_utf8_lossy(filename).into_owned(),
        mode: String::from_utf8_lossy(mode).to_ascii_lowercase(),
        options,
    })
}

/// Parses what a client sends during a transfer.
pub fn parse_client_packet(buf: &[u8]) -> ClientPacket {
    if buf.len() < 4 {
        return ClientPacket::Other;
    }
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    let n = u16::from_be_bytes([buf[2], buf[3]]);
    match op {
        opcode::ACK => ClientPacket::Ack(n),
        opcode::ERROR => ClientPacket::Error(n),
        _ => ClientPacket::Other,
    }
}

/// An ERROR packet.
pub fn error(code: u16, message: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + message.len());
    b.extend_from_slice(&opcode::ERROR.to_be_bytes());
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(message.as_bytes());
    b.push(0);
    b
}

/// An OACK packet.
pub fn oack(options: &[(&str, String)]) -> Vec<u8> {
    let mut b = opcode::OACK.to_be_bytes().to_vec();
    for (k, v) in options {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_with_options() {
        let r = parse_request(b"\0\x01/a/b.bin\0OCTET\0blksize\x001468\0TSize\x000\0").unwrap();
        assert!(!r.write);
        assert_eq!(r.filename, "/a/b.bin");
        assert_eq!(r.mode, "octet");
        assert_eq!(
            r.options,
            vec![
                ("blksize".to_string(), "1468".to_string()),
                ("tsize".to_string(), "0".to_string())
            ]
        );
        let w = parse_request(b"\0\x02f\0octet\0").unwrap();
        assert!(w.write);
        assert!(w.options.is_empty());
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(parse_request(b""), Err(ParseError::TooShort));
        assert_eq!(
            parse_request(b"\0\x04\0\x01"),
            Err(ParseError::NotARequest(4))
        );
        assert_eq!(parse_request(b"\0\x01file"), Err(ParseError::MissingField));
        assert_eq!(
            parse_request(b"\0\x01\0octet\0"),
            Err(ParseError::MissingField)
        );
        // An unterminated trailing option is ignored.
        let r = parse_request(b"\0\x01f\0octet\0blksize\x00512").unwrap();
        assert!(r.options.is_empty());
        let r = parse_request(b"\0\x01f\0octet\0blksize").unwrap();
        assert!(r.options.is_empty());
    }

    #[test]
    fn client_packets() {
        assert_eq!(
            parse_client_packet(b"\0\x04\x01\x02"),
            ClientPacket::Ack(0x102)
        );
        assert_eq!(
            parse_client_packet(b"\0\x05\0\x01x\0"),
            ClientPacket::Error(1)
        );
        assert_eq!(parse_client_packet(b"\0\x04"), ClientPacket::Other);
        assert_eq!(error(1, "File not found"), b"\0\x05\0\x01File not found\0");
        assert_eq!(oack(&[("tsize", "3".into())]), b"\0\x06tsize\x003\0");
    }
}
