//! vivian-boots (being written).
