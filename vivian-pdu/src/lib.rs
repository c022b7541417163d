//! vivian-pdu (being written).
