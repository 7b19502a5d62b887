//! File helpers shared by brokerd and brokerctl.

use std::{io::Write as _, path::Path};

/// Writes a file through a temporary sibling, fsync and a rename, so a reader (or a crash)
/// never sees half of it. The file gets the default mode (umask applies).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
