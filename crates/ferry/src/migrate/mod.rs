//! Live migration: source, target, convergence controllers (being written).

pub mod controller;
pub mod mempages;
