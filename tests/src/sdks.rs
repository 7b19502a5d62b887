//! The official LLM SDKs agents run (OpenAI's and Anthropic's Python packages, and the
//! `websockets` package), installed once per machine from PyPI into a virtualenv under /var/tmp
//! (see [`crate::venv`]). Pinned, so a run is repeatable.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The packages installed, pinned.
const PACKAGES: [&str; 3] = ["openai==3.57.0", "anthropic==2.16.0", "websockets==17.4"];

/// The virtualenv's python, created on first use (a run that finds it ready reuses it).
pub fn sdk_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| crate::venv::venv("sdks", &PACKAGES))
}
