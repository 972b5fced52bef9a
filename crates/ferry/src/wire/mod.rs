//! The migration protocol (being written).
