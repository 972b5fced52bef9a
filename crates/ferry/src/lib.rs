//! ferry: live migration of running Linux process trees.
//!
//! The engine is layered so data flows one way: [`proc`] reads a live
//! process, [`checkpoint`] freezes it and builds an [`image`] model,
//! [`restore`] rebuilds a process from that model. Everything that needs
//! `unsafe` (ptrace, raw syscalls) is fenced inside [`sys`].
#![deny(unsafe_code)]

pub mod checkpoint;
pub mod image;
pub mod jobinit;
pub mod migrate;
pub mod proc;
pub mod remote;
pub mod restore;
pub mod sys;
pub mod track;
pub mod wire;
