//! A reader of fuzzer bytes for the structured targets (`audit`, `proxy`): each call takes
//! what it needs from the front, and an exhausted input reads as zeros and empty slices, so
//! every input, however short, is one valid case.

/// Fuzzer bytes, read from the front.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length byte (below `max`), then that many bytes.
    pub fn short(&mut self, max: u8) -> &'a [u8] {
        let n = self.u8() % max;
        self.bytes(usize::from(n))
    }

    /// [`Input::short`] as text (invalid UTF-8 replaced).
    pub fn text(&mut self, max: u8) -> String {
        String::from_utf8_lossy(self.short(max)).into_owned()
    }
}
