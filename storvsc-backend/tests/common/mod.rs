//! Shared by the integration tests and the benchmark example.
#![allow(dead_code)]

pub mod guest;
pub mod workload;
