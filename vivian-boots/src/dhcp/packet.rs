//! DHCP wire format: parsing a client's request and encoding our reply.
//!
//! The fixed BOOTP header is decoded with `dhcproto`. Options are walked
//! here, one TLV at a time with every length checked against the buffer,
//! and only the options the server uses are handed to `dhcproto`, each on a
//! slice of exactly its own length: a malformed option can neither panic
//! nor shift the parsing of the ones after it. Replies are encoded with
//! `dhcproto` option by option, because the option order matters to some
//! firmware (IN B.3) and `dhcproto`'s option map has none.

use std::net::Ipv4Addr;

use dhcproto::v4::{
    DhcpOption, Encodable, Encoder, Flags, HType, Message, MessageType, Opcode, OptionCode,
    UnknownOption, MAGIC,
};
use dhcproto::Decodable;
use dhcproto::Decoder;
use vivian_core::marsdb::MacAddr;

/// Size of the BOOTP header including the magic cookie.
pub const HEADER_LEN: usize = 240;
/// Minimum size of a BOOTP message on the wire (RFC 1542).
pub const MIN_REPLY_LEN: usize = 300;

/// Why a packet was not a DHCP request we can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the BOOTP header.
    #[error("packet of {0} bytes is shorter than a BOOTP header")]
    TooShort(usize),
    /// `op` is not BOOTREQUEST.
    #[error("not a BOOTREQUEST (op {0})")]
    NotARequest(u8),
    /// Not Ethernet or not a 6-byte hardware address.
    #[error("unsupported hardware type {htype} / length {hlen}")]
    UnsupportedHardware {
        /// `htype` field.
        htype: u8,
        /// `hlen` field.
        hlen: u8,
    },
    /// The DHCP magic cookie is missing.
    #[error("missing DHCP magic cookie")]
    BadMagic,
    /// An option runs past the end of the packet.
    #[error("option {code} runs past the end of the packet")]
    TruncatedOption {
        /// Option code.
        code: u8,
    },
    /// No option 53, or an invalid one.
    #[error("missing or invalid DHCP message type (option 53)")]
    NoMessageType,
    /// `dhcproto` refused the header.
    #[error("malformed BOOTP header: {0}")]
    Header(String),
}

/// The parts of a client's DHCP message the server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRequest {
    /// Option 53.
    pub message_type: MessageType,
    /// Transaction id.
    pub xid: u32,
    /// `flags` field.
    pub flags: u16,
    /// `ciaddr` field.
    pub ciaddr: Ipv4Addr,
    /// `giaddr` field: the relay agent's address, or 0.
    pub giaddr: Ipv4Addr,
    /// `hops` field.
    pub hops: u8,
    /// The full 16-byte `chaddr` field, echoed in replies.
    pub chaddr: [u8; 16],
    /// The client's MAC (first 6 bytes of `chaddr`).
    pub mac: MacAddr,
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Option 55, as raw codes.
    pub parameter_request_list: Vec<u8>,
    /// Option 60.
    pub vendor_class: Option<Vec<u8>>,
    /// Option 77.
    pub user_class: Option<Vec<u8>>,
    /// First entry of option 93.
    pub client_arch: Option<u16>,
    /// Option 12.
    pub hostname: Option<String>,
}

impl DhcpRequest {
    /// True when the user class (option 77) says `iPXE`, either as the plain
    /// string iPXE sends or as an RFC 3004 list containing it.
    pub fn is_ipxe(&self) -> bool {
        let Some(uc) = self.user_class.as_deref() else {
            return false;
        };
        if uc == b"iPXE" {
            return true;
        }
        // RFC 3004: a sequence of (length, data) items.
        let mut rest = uc;
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len);
            if len == 0 || len > tail.len() {
                return false;
            }
            if &tail[..len] == b"iPXE" {
                return true;
            }
            rest = &tail[len..];
        }
        false
    }

    /// The vendor class as text (lossy), if any.
    pub fn vendor_class_str(&self) -> Option<String> {
        self.vendor_class
            .as_deref()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Parses a client's DHCP message. Never panics, allocates at most a few
/// copies of option payloads (each under 256 bytes).
pub fn parse_request(buf: &[u8]) -> Result<DhcpRequest, ParseError> {
    if buf.len() < HEADER_LEN {
        return Err(ParseError::TooShort(buf.len()));
    }
    if buf[0] != 1 {
        return Err(ParseError::NotARequest(buf[0]));
    }
    if buf[1] != 1 || buf[2] != 6 {
        return Err(ParseError::UnsupportedHardware {
            htype: buf[1],
            hlen: buf[2],
        });
    }
    if buf[236..240] != MAGIC {
        return Err(ParseError::BadMagic);
    }
    // Only the header: dhcproto's own option decoder trusts some lengths.
    let header = Message::decode(&mut Decoder::new(&buf[..HEADER_LEN]))
        .map_err(|e| ParseError::Header(e.to_string()))?;
    let mut chaddr = [0u8; 16];
    chaddr.copy_from_slice(&buf[28..44]);
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&buf[28..34]);

    let mut req = DhcpRequest {
        message_type: MessageType::Unknown(0),
        xid: header.xid(),
        flags: u16::from_be_bytes([buf[10], buf[11]]),
        ciaddr: header.ciaddr(),
        giaddr: header.giaddr(),
        hops: buf[3],
        chaddr,
        mac: MacAddr(mac),
        requested_ip: None,
        server_id: None,
        parameter_request_list: Vec::new(),
        vendor_class: None,
        user_class: None,
        client_arch: None,
        hostname: None,
    };
    let mut have_type = false;

    let mut i = HEADER_LEN;
    while i < buf.len() {
        let code = buf[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = buf.get(i + 1) else {
            return Err(ParseError::TruncatedOption { code });
        };
        let end = i + 2 + usize::from(len);
        if end > buf.len() {
            return Err(ParseError::TruncatedOption { code });
        }
        let tlv = &buf[i..end];
        let data = &buf[i + 2..end];
        i = end;
        match code {
            53 => {
                if let Some(DhcpOption::MessageType(t)) = decode_option(tlv) {
                    if !have_type {
                        req.message_type = t;
                        have_type = true;
                    }
                }
            }
            50 if data.len() == 4 => {
                if let Some(DhcpOption::RequestedIpAddress(ip)) = decode_option(tlv) {
                    req.requested_ip = Some(ip);
                }
            }
            54 if data.len() == 4 => {
                if let Some(DhcpOption::ServerIdentifier(ip)) = decode_option(tlv) {
                    req.server_id = Some(ip);
                }
            }
            55 => {
                if let Some(DhcpOption::ParameterRequestList(codes)) = decode_option(tlv) {
                    req.parameter_request_list = codes.into_iter().map(u8::from).collect();
                }
            }
            60 => {
                if let Some(DhcpOption::ClassIdentifier(v)) = decode_option(tlv) {
                    req.vendor_class = Some(v);
                }
            }
            77 => {
                if let Some(DhcpOption::UserClass(v)) = decode_option(tlv) {
                    req.user_class = Some(v);
                }
            }
            // RFC 4578: a list of 16-bit types; the first one is the client's.
            93 if data.len() >= 2 && data.len() % 2 == 0 => {
                req.client_arch = Some(u16::from_be_bytes([data[0], data[1]]));
            }
            12 => {
                if let Some(DhcpOption::Hostname(h)) = decode_option(tlv) {
                    req.hostname = Some(h);
                }
            }
            _ => {}
        }
    }
    if !have_type || matches!(req.message_type, MessageType::Unknown(_)) {
        return Err(ParseError::NoMessageType);
    }
    Ok(req)
}

/// Decodes one option from a slice holding exactly its code, length and data.
fn decode_option(tlv: &[u8]) -> Option<DhcpOption> {
    DhcpOption::decode(&mut Decoder::new(tlv)).ok()
}

/// Everything that goes into one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// OFFER, ACK or NAK.
    pub message_type: MessageType,
    /// Address given (0 for a NAK).
    pub yiaddr: Ipv4Addr,
    /// Our address: option 54, router, DNS, next-server, TFTP server.
    pub server_ip: Ipv4Addr,
    /// Subnet mask (option 1).
    pub netmask: Ipv4Addr,
    /// Lease time in seconds (option 51).
    pub lease_secs: u32,
    /// Boot file (option 67), if any; option 66 is sent with it.
    pub bootfile: Option<String>,
    /// Send option 175 with sub-option 176 = 1 (iPXE: skip ProxyDHCP).
    pub ipxe_no_proxydhcp: bool,
}

/// Encodes a reply to `req`. Options in the order of IN B.3: 53, 54, 1, 3,
/// 6, 51, 66, (175), 67, one pad byte, 255; padded to 300 bytes.
/// A NAK carries only 53 and 54.
pub fn encode_reply(req: &DhcpRequest, reply: &Reply) -> Vec<u8> {
    let nak = reply.message_type == MessageType::Nak;
    let mut msg = Message::default();
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_xid(req.xid)
        .set_secs(0)
        .set_flags(Flags::new(0x8000))
        .set_ciaddr(Ipv4Addr::UNSPECIFIED)
        .set_yiaddr(if nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            reply.yiaddr
        })
        .set_siaddr(if nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            reply.server_ip
        })
        .set_giaddr(req.giaddr)
        .set_chaddr(&req.chaddr);
    // set_chaddr sets hlen from the slice length; we echo all 16 bytes of
    // chaddr but the hardware address is 6 bytes long.
    let mut out = Vec::with_capacity(400);
    {
        let mut e = Encoder::new(&mut out);
        // Infallible on a Vec: the encoder only fails on fixed buffers.
        let _ = msg.encode(&mut e);
    }
    out[2] = 6;
    out[3] = 0; // hops
    let mut opts = Vec::with_capacity(160);
    {
        let mut e = Encoder::new(&mut opts);
        let mut put = |opt: DhcpOption| {
            let _ = opt.encode(&mut e);
        };
        put(DhcpOption::MessageType(reply.message_type));
        put(DhcpOption::ServerIdentifier(reply.server_ip));
        if !nak {
            put(DhcpOption::SubnetMask(reply.netmask));
            put(DhcpOption::Router(vec![reply.server_ip]));
            put(DhcpOption::DomainNameServer(vec![reply.server_ip]));
            put(DhcpOption::AddressLeaseTime(reply.lease_secs));
            if reply.bootfile.is_some() {
                put(DhcpOption::TFTPServerName(
                    reply.server_ip.to_string().into_bytes(),
                ));
            }
            if reply.ipxe_no_proxydhcp {
                put(DhcpOption::Unknown(UnknownOption::new(
                    OptionCode::from(175),
                    vec![176, 1, 1],
                )));
            }
            if let Some(file) = &reply.bootfile {
                // Option payloads are at most 255 bytes.
                let mut bytes = file.as_bytes().to_vec();
                bytes.truncate(255);
                put(DhcpOption::BootfileName(bytes));
            }
        }
    }
    out.extend_from_slice(&opts);
    if !nak && reply.bootfile.is_some() {
        // For clients that expect the boot file name to be NUL-terminated.
        out.push(0);
    }
    out.push(255);
    if out.len() < MIN_REPLY_LEN {
        out.resize(MIN_REPLY_LEN, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a request the way firmware does.
    pub(crate) fn request(mac: [u8; 6], options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&0x26f3_0339u32.to_be_bytes());
        b[28..34].copy_from_slice(&mac);
        b[236..240].copy_from_slice(&MAGIC);
        for (code, data) in options {
            b.push(*code);
            b.push(data.len() as u8);
            b.extend_from_slice(data);
        }
        b.push(255);
        b
    }

    #[test]
    fn parses_a_pxe_discover() {
        let pkt = request(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            &[
                (53, &[1]),
                (57, &[5, 0xc0]),
                (93, &[0, 0]),
                (94, &[1, 2, 1]),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (77, b"iPXE"),
                (
                    55,
                    &[1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 175],
                ),
            ],
        );
        let r = parse_request(&pkt).unwrap();
        assert_eq!(r.message_type, MessageType::Discover);
        assert_eq!(r.xid, 0x26f30339);
        assert_eq!(r.mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(r.client_arch, Some(0));
        assert!(r.is_ipxe());
        assert!(r.parameter_request_list.contains(&67));
        assert_eq!(
            r.vendor_class_str().as_deref(),
            Some("PXEClient:Arch:00000:UNDI:002001")
        );
    }

    #[test]
    fn rfc3004_user_class_and_arch_lists() {
        let pkt = request(
            [1, 2, 3, 4, 5, 6],
            &[(53, &[3]), (77, b"\x03abc\x04iPXE"), (93, &[0, 7, 0, 9])],
        );
        let r = parse_request(&pkt).unwrap();
        assert_eq!(r.message_type, MessageType::Request);
        assert!(r.is_ipxe());
        assert_eq!(r.client_arch, Some(7));
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert_eq!(parse_request(&[]), Err(ParseError::TooShort(0)));
        let mut p = request([1; 6], &[(53, &[1])]);
        p[0] = 2;
        assert_eq!(parse_request(&p), Err(ParseError::NotARequest(2)));
        let mut p = request([1; 6], &[(53, &[1])]);
        p[236] = 0;
        assert_eq!(parse_request(&p), Err(ParseError::BadMagic));
        let mut p = request([1; 6], &[(53, &[1])]);
        p.pop();
        p.extend_from_slice(&[60, 200, 1, 2]);
        assert_eq!(
            parse_request(&p),
            Err(ParseError::TruncatedOption { code: 60 })
        );
        let p = request([1; 6], &[(12, b"host")]);
        assert_eq!(parse_request(&p), Err(ParseError::NoMessageType));
        // A wrongly sized fixed option is ignored, not misparsed.
        let p = request([1; 6], &[(53, &[1]), (50, &[10, 0, 0]), (94, &[1])]);
        let r = parse_request(&p).unwrap();
        assert_eq!(r.requested_ip, None);
    }

    #[test]
    fn reply_options_come_in_the_documented_order() {
        let req = parse_request(&request([1, 2, 3, 4, 5, 6], &[(53, &[1])])).unwrap();
        let reply = Reply {
            message_type: MessageType::Offer,
            yiaddr: Ipv4Addr::new(10, 0, 0, 2),
            server_ip: Ipv4Addr::new(10, 0, 0, 1),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            lease_secs: 86400,
            bootfile: Some("http://x/boot.ipxe".into()),
            ipxe_no_proxydhcp: true,
        };
        let b = encode_reply(&req, &reply);
        assert!(b.len() >= MIN_REPLY_LEN);
        assert_eq!(b[0], 2);
        assert_eq!(&b[4..8], &0x26f30339u32.to_be_bytes());
        assert_eq!(&b[10..12], &[0x80, 0]);
        assert_eq!(&b[16..20], &[10, 0, 0, 2]);
        assert_eq!(&b[20..24], &[10, 0, 0, 1]);
        assert_eq!(&b[28..34], &[1, 2, 3, 4, 5, 6]);
        let mut codes = vec![];
        let mut i = HEADER_LEN;
        while b[i] != 255 {
            if b[i] == 0 {
                codes.push(0);
                i += 1;
                continue;
            }
            codes.push(b[i]);
            if b[i] == 67 {
                assert_eq!(&b[i + 2..i + 2 + b[i + 1] as usize], b"http://x/boot.ipxe");
            }
            if b[i] == 175 {
                assert_eq!(&b[i + 1..i + 5], &[3, 176, 1, 1]);
            }
            i += 2 + b[i + 1] as usize;
        }
        assert_eq!(codes, vec![53, 54, 1, 3, 6, 51, 66, 175, 67, 0]);
    }
}
