//! mpcs: reproduce MPCS (WACV 2023) as a content-addressed experiment DAG.
//!
//! The flow of data, one module per step:
//! `experiment` (TOML → typed, validated stages) → `plan` (matrix expansion into a DAG, action keys) →
//! `exec` (scheduler, device slots, progress) → `cache` (entries, locks, fingerprints, journal, gc/verify) →
//! `lineage` (states, why a node reruns, graph renderings); `remote` shares cache entries through S3. `stages` holds
//! one file per stage kind.
//! The binary (`src/main.rs`) is a thin CLI over `commands`.

pub mod bench;
pub mod cache;
pub mod commands;
pub mod data;
pub mod doctor;
pub mod download;
pub mod error;
pub mod exec;
pub mod experiment;
pub mod fsutil;
pub mod infer;
pub mod lineage;
pub mod loader;
pub mod metrics;
pub mod nn;
pub mod optim;
pub mod patchify;
pub mod plan;
pub mod remote;
pub mod report;
pub mod results;
pub mod runtime;
pub mod split;
pub mod stages;
pub mod stain;
pub mod table;
pub mod train;
