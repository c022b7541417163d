//! vivian-gitlab (being written).
