//! marsdb (being written).
