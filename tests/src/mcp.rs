//! The official MCP Python SDK (`mcp` from PyPI), installed once per machine into a virtualenv
//! under /var/tmp (see [`crate::venv`]). Pinned, so a run is repeatable.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The packages installed, pinned.
const PACKAGES: [&str; 1] = ["mcp==1.30.0"];

/// The virtualenv's python, created on first use (a run that finds it ready reuses it).
pub fn mcp_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| crate::venv::venv("mcp", &PACKAGES))
}
