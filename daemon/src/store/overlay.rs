//! A copy-on-write view of a file for redb: reads come from the file, writes stay in memory.
//!
//! An existing store is checked on this view before it is opened for writing (redb's crash
//! repair and integrity check both write), so a corrupt or foreign file is refused with not one
//! byte of it changed, and without reading a large file into memory: only the pages redb writes
//! are held.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::{Mutex, MutexGuard};

use redb::StorageBackend;

const BLOCK: u64 = 4096;

#[derive(Debug)]
pub(super) struct Overlay {
    file: File,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The view's length.
    len: u64,
    /// Bytes of the file at or past this offset read as zeros (the view was once cut there).
    file_end: u64,
    /// Written blocks, by index, each BLOCK bytes.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl Overlay {
    /// A view of `file`, which is only ever read.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            state: Mutex::new(State {
                len,
                file_end: len,
                blocks: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("overlay state poisoned"))
    }

    /// Block `index` as the view holds it, when it was never written.
    fn read_base(&self, state: &State, index: u64, out: &mut [u8]) -> io::Result<()> {
        let start = index * BLOCK;
        let from_file = state.file_end.saturating_sub(start).min(out.len() as u64) as usize;
        let (head, tail) = out.split_at_mut(from_file);
        self.file.read_exact_at(head, start)?;
        tail.fill(0);
        Ok(())
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "read past the end of the view",
    )
}

impl StorageBackend for Overlay {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.lock()?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let state = self.lock()?;
        let end = offset
            .checked_add(out.len() as u64)
            .ok_or_else(out_of_range)?;
        if end > state.len {
            return Err(out_of_range());
        }
        let mut pos = offset;
        let mut done = 0usize;
        while done < out.len() {
            let index = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match state.blocks.get(&index) {
                Some(block) => dst.copy_from_slice(&block[within..within + n]),
                None => {
                    let mut block = [0u8; BLOCK as usize];
                    self.read_base(&state, index, &mut block[..within + n])?;
                    dst.copy_from_slice(&block[within..within + n]);
                }
            }
            pos += n as u64;
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut state = self.lock()?;
        if len < state.len {
            state.file_end = state.file_end.min(len);
            let cut_index = len / BLOCK;
            let cut_within = (len % BLOCK) as usize;
            state.blocks.retain(|&index, _| index <= cut_index);
            if let Some(block) = state.blocks.get_mut(&cut_index) {
                block[cut_within..].fill(0);
            }
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut state = self.lock()?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(out_of_range)?;
        let mut pos = offset;
        let mut done = 0usize;
        while done < data.len() {
            let index = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(data.len() - done);
            if !state.blocks.contains_key(&index) {
                let mut block = vec![0u8; BLOCK as usize].into_boxed_slice();
                // Only the part inside the view has contents; the rest is zeros.
                let valid = state.len.saturating_sub(index * BLOCK).min(BLOCK) as usize;
                self.read_base(&state, index, &mut block[..valid])?;
                state.blocks.insert(index, block);
            }
            if let Some(block) = state.blocks.get_mut(&index) {
                block[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            pos += n as u64;
            done += n;
        }
        state.len = state.len.max(end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stay_in_memory_and_reads_see_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).expect("write");
        let view = Overlay::new(File::open(&path).expect("open")).expect("view");
        assert_eq!(view.len().expect("len"), 10_000);

        view.write(4090, &[0xAA; 20]).expect("write across blocks");
        let mut out = vec![0u8; 30];
        view.read(4085, &mut out).expect("read");
        assert_eq!(&out[..5], &original[4085..4090]);
        assert_eq!(&out[5..25], &[0xAA; 20]);
        assert_eq!(&out[25..], &original[4110..4115]);

        // Cut, grow: the cut-off bytes read as zeros, from the file and from written blocks.
        view.set_len(4095).expect("cut");
        view.set_len(20_000).expect("grow");
        let mut out = vec![1u8; 10];
        view.read(4090, &mut out).expect("read");
        assert_eq!(&out[..5], &[0xAA; 5]);
        assert_eq!(&out[5..], &[0; 5]);
        let mut out = vec![1u8; 8];
        view.read(9_000, &mut out).expect("read");
        assert_eq!(out, [0; 8]);
        view.write(19_999, &[7]).expect("write at the end");
        assert!(view.read(19_999, &mut [0u8; 2]).is_err(), "past the end");

        assert_eq!(std::fs::read(&path).expect("read back"), original);
    }
}
