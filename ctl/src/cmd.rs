//! The subcommands, one module each: its clap arguments and the code that carries it out.
//! `main` parses and dispatches; what they share is in `control` (asking brokerd) and `print`.

pub mod approve;
pub mod attach;
pub mod ca;
pub mod connections;
pub mod doctor;
pub mod handle;
pub mod logs;
pub mod metrics;
pub mod oci_hook;
pub mod policy;
pub mod run;
pub mod secret;
pub mod status;
