//! state (being written).
