//! mpcs: reproduce MPCS (WACV 2023) as a content-addressed experiment DAG.
//!
//! The binary (`src/main.rs`) is a thin CLI over these modules.
pub mod nn;
