//! Any datagram given to the TFTP server: as a request (then option
//! negotiation and path resolution) and as a packet during a transfer.
//! Nothing may panic; the root is never escaped.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vivian_boots::tftp::{negotiate, open_in_root, packet, MAX_BLKSIZE, MAX_WINDOWSIZE};

fuzz_target!(|data: &[u8]| {
    let _ = packet::parse_client_packet(data);
    let Ok(req) = packet::parse_request(data) else {
        return;
    };
    assert!(req.options.len() <= packet::MAX_OPTIONS);
    let (n, ack) = negotiate(&req.options, 12345, Duration::from_secs(1));
    assert!(n.blksize >= 8 && n.blksize <= MAX_BLKSIZE);
    assert!(n.windowsize >= 1 && n.windowsize <= MAX_WINDOWSIZE);
    assert_eq!(n.oack, !ack.is_empty());
    // An empty root: nothing can be found, whatever the name.
    let root = std::env::temp_dir().join("vivian-boots-fuzz-empty-root");
    let _ = std::fs::create_dir_all(&root);
    if let Ok(root) = root.canonicalize() {
        assert!(open_in_root(&root, &req.filename).is_err());
    }
});
