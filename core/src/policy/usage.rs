//! The LLM tokens a response reports, read as its body streams ([`UsageMeter`]), for
//! `tokens_per_day` budgets.
//!
//! Nothing is buffered but the `usage` objects themselves (at most [`MAX_USAGE_OBJECT`] bytes
//! each): a JSON body of any size is scanned byte by byte, tracking strings and nesting, for a
//! top-level `usage` key; an event stream (`text/event-stream`) is split into events and the JSON
//! of each event's `data` scanned the same way, for `usage` and Anthropic's `message.usage`. What
//! a model writes is inside JSON strings, so text that looks like a `usage` object in its output
//! is never read as one.
//!
//! How tokens are counted from what is found: `total_tokens` if present (OpenAI), else
//! `prompt_tokens + completion_tokens` (OpenAI), else `input_tokens` (with Anthropic's cache read
//! and creation input tokens added when reported) plus the last `output_tokens`. In an event
//! stream the input of `message_start` and the last `output_tokens` of `message_delta` (Anthropic)
//! combine, and the last total wins (OpenAI's final chunk with `stream_options.include_usage`).

/// Largest `usage` object read; a larger one is not read (the body's usage is then unreadable).
pub const MAX_USAGE_OBJECT: usize = 64 * 1024;

/// What a response body said about the tokens it used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageReading {
    /// The API reported this many tokens.
    Reported(u64),
    /// The body was whole JSON (or empty) and reported no usage: an endpoint that uses no tokens,
    /// such as a model list or an error.
    NoneReported,
    /// The usage could not be read: why, and what the body reported before it ended, if anything
    /// (an event stream cut after its first usage event).
    Unreadable { why: String, partial: Option<u64> },
}

/// Reads the usage of one response body as it streams: [`UsageMeter::feed`] every chunk, then
/// [`UsageMeter::finish`].
#[derive(Debug, Default)]
pub struct UsageMeter {
    mode: Mode,
}

#[derive(Debug, Default)]
enum Mode {
    /// Nothing but whitespace yet: a body starting with `{` or `[` is JSON, anything else is
    /// read as an event stream.
    #[default]
    Sniff,
    Json(JsonScan),
    Events(EventScan),
}

impl UsageMeter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if let Mode::Sniff = self.mode {
            let start = rest
                .iter()
                .position(|b| !b.is_ascii_whitespace() && !BOM.contains(b));
            let Some(start) = start else { return };
            rest = &rest[start..];
            self.mode = if matches!(rest[0], b'{' | b'[') {
                Mode::Json(JsonScan::default())
            } else {
                Mode::Events(EventScan::at_line_start())
            };
        }
        match &mut self.mode {
            Mode::Sniff => {}
            Mode::Json(scan) => rest.iter().for_each(|&b| scan.byte(b)),
            Mode::Events(events) => rest.iter().for_each(|&b| events.byte(b)),
        }
    }

    /// What the body reported. `whole` is false when it did not reach its end (the upstream cut
    /// it, or the agent stopped reading): its usage, usually at the very end, is then unreadable.
    pub fn finish(self, whole: bool) -> UsageReading {
        let (tally, shape) = match self.mode {
            Mode::Sniff if whole => return UsageReading::NoneReported,
            Mode::Sniff => {
                return UsageReading::Unreadable {
                    why: "the response ended before its body began".into(),
                    partial: None,
                };
            }
            Mode::Json(scan) => {
                let complete = scan.is_complete();
                (scan.tally, Shape::Json { complete })
            }
            Mode::Events(events) => (events.json.tally, Shape::Events),
        };
        let partial = tally.tokens();
        let unreadable = |why: &str| UsageReading::Unreadable {
            why: why.into(),
            partial,
        };
        if tally.too_large {
            return unreadable("the response's usage object is too large to read");
        }
        if !whole {
            return unreadable("the response was cut before its end, where its usage is");
        }
        match (shape, partial) {
            (_, Some(tokens)) => UsageReading::Reported(tokens),
            (Shape::Json { complete: true }, None) => UsageReading::NoneReported,
            (Shape::Json { complete: false }, None) => {
                unreadable("the response is not whole JSON and reports no usage")
            }
            (Shape::Events, None) => unreadable(
                "the event stream reported no usage (OpenAI streams report it only with \
                 stream_options.include_usage)",
            ),
        }
    }
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

enum Shape {
    Json { complete: bool },
    Events,
}

/// Usage found so far.
#[derive(Debug, Default)]
struct Tally {
    total: Option<u64>,
    input: Option<u64>,
    output: Option<u64>,
    /// A usage object was larger than [`MAX_USAGE_OBJECT`].
    too_large: bool,
}

impl Tally {
    fn add(&mut self, target: Target, value: &serde_json::Value) {
        if !value.is_object() {
            return;
        }
        match target {
            // Anthropic's message_start: the input, and the output so far.
            Target::MessageUsage => {
                self.input = Some(sum_input(value));
                self.output = field(value, "output_tokens").or(self.output);
            }
            Target::Usage => {
                if let Some(t) = field(value, "total_tokens") {
                    self.total = Some(t);
                } else if let (Some(p), Some(c)) = (
                    field(value, "prompt_tokens"),
                    field(value, "completion_tokens"),
                ) {
                    self.total = Some(p.saturating_add(c));
                } else {
                    if value.get("input_tokens").is_some() {
                        self.input = Some(sum_input(value));
                    }
                    self.output = field(value, "output_tokens").or(self.output);
                }
            }
        }
    }

    fn tokens(&self) -> Option<u64> {
        self.total.or(match (self.input, self.output) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
        })
    }
}

fn sum_input(u: &serde_json::Value) -> u64 {
    [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .filter_map(|k| field(u, k))
    .fold(0, u64::saturating_add)
}

fn field(u: &serde_json::Value, key: &str) -> Option<u64> {
    u.get(key)?.as_u64()
}

/// Where a usage object was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `usage` of a top-level object.
    Usage,
    /// `message.usage` of a top-level object (Anthropic's `message_start`).
    MessageUsage,
}

/// A key of the top two levels, as far as usage is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Key {
    #[default]
    Other,
    Usage,
    Message,
}

/// Longest key remembered (longer keys are none of the ones looked for).
const MAX_KEY: usize = 16;

/// A streaming scan of JSON text (one document or several in a row) for usage objects. It
/// tracks strings, escapes and nesting; it does not validate.
#[derive(Debug, Default)]
struct JsonScan {
    depth: u32,
    /// Whether the container at depth 1, 2, 3 is an object (deeper levels are not tracked).
    objects: [bool; 3],
    /// The key being read or last read at depth 1 and 2.
    keys: [Key; 2],
    in_string: bool,
    escape: bool,
    /// Inside an object, before its next key.
    expect_key: bool,
    reading_key: bool,
    key: Vec<u8>,
    /// A usage object's value starts with the next token.
    pending: Option<Target>,
    capture: Option<Capture>,
    /// Some container was opened (the text is JSON, not a bare scalar).
    opened: bool,
    tally: Tally,
}

#[derive(Debug)]
struct Capture {
    target: Target,
    /// The depth outside the captured object.
    depth: u32,
    bytes: Vec<u8>,
    too_large: bool,
}

impl JsonScan {
    /// Whether every container opened was closed, outside any string.
    fn is_complete(&self) -> bool {
        self.opened && self.depth == 0 && !self.in_string
    }

    /// Forgets the lexical state (a new event's data), keeping the tally.
    fn restart(&mut self) {
        let tally = std::mem::take(&mut self.tally);
        *self = Self {
            tally,
            ..Self::default()
        };
    }

    fn in_object(&self) -> bool {
        matches!(self.depth, 1..=3) && self.objects[self.depth as usize - 1]
    }

    fn byte(&mut self, b: u8) {
        if let Some(c) = &mut self.capture {
            if c.bytes.len() < MAX_USAGE_OBJECT {
                c.bytes.push(b);
            } else {
                c.too_large = true;
            }
        }
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    self.key_read();
                }
                return;
            }
            if self.reading_key && self.key.len() <= MAX_KEY {
                self.key.push(b);
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                self.in_string = true;
                if self.expect_key && self.in_object() {
                    self.expect_key = false;
                    self.reading_key = self.depth <= 2;
                    self.key.clear();
                } else {
                    self.pending = None;
                }
            }
            b'{' | b'[' => {
                if let Some(target) = self.pending.take()
                    && b == b'{'
                    && self.capture.is_none()
                {
                    self.capture = Some(Capture {
                        target,
                        depth: self.depth,
                        bytes: vec![b'{'],
                        too_large: false,
                    });
                }
                self.depth = self.depth.saturating_add(1);
                self.opened = true;
                if let Some(slot) = self.objects.get_mut(self.depth as usize - 1) {
                    *slot = b == b'{';
                }
                if let Some(slot) = self.keys.get_mut(self.depth as usize - 1) {
                    *slot = Key::Other;
                }
                self.expect_key = b == b'{';
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                self.expect_key = false;
                self.pending = None;
                if self.capture.as_ref().is_some_and(|c| c.depth == self.depth)
                    && let Some(capture) = self.capture.take()
                {
                    self.captured(capture);
                }
            }
            b':' => {
                self.pending = match (self.depth, self.keys) {
                    (1, [Key::Usage, _]) if self.in_object() => Some(Target::Usage),
                    (2, [Key::Message, Key::Usage]) if self.objects[..2] == [true, true] => {
                        Some(Target::MessageUsage)
                    }
                    _ => None,
                };
            }
            b',' => {
                self.pending = None;
                self.expect_key = self.in_object();
            }
            // A number, true, false or null.
            _ => self.pending = None,
        }
    }

    fn key_read(&mut self) {
        let key = match self.key.as_slice() {
            b"usage" => Key::Usage,
            b"message" => Key::Message,
            _ => Key::Other,
        };
        if let Some(slot) = self.keys.get_mut(self.depth as usize - 1) {
            *slot = key;
        }
    }

    fn captured(&mut self, capture: Capture) {
        if capture.too_large {
            self.tally.too_large = true;
            return;
        }
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&capture.bytes) {
            self.tally.add(capture.target, &value);
        }
    }
}

/// A streaming reader of a `text/event-stream`: the `data` lines of each event are scanned as
/// one JSON text (joined by newlines, as the format says).
#[derive(Debug, Default)]
struct EventScan {
    json: JsonScan,
    /// The field name of the current line, until its `:` (None once past it).
    field: Option<Vec<u8>>,
    /// The current line is a `data` line, past its `:`.
    in_data: bool,
    /// The one space after `data:` is not part of the value.
    skip_space: bool,
    /// The last byte was a CR (a CRLF is one line end).
    after_cr: bool,
    /// The current event has data.
    has_data: bool,
}

impl EventScan {
    fn at_line_start() -> Self {
        Self {
            field: Some(Vec::new()),
            ..Self::default()
        }
    }

    fn byte(&mut self, b: u8) {
        if b == b'\n' && self.after_cr {
            self.after_cr = false;
            return;
        }
        self.after_cr = b == b'\r';
        if b == b'\n' || b == b'\r' {
            return self.line_end();
        }
        match &mut self.field {
            None if self.in_data => {
                if std::mem::take(&mut self.skip_space) && b == b' ' {
                    return;
                }
                self.json.byte(b);
            }
            None => {}
            Some(field) if b == b':' => {
                self.in_data = field.as_slice() == b"data";
                self.skip_space = true;
                self.field = None;
                if self.in_data && self.has_data {
                    // Data lines of one event are joined by a newline.
                    self.json.byte(b'\n');
                }
                self.has_data |= self.in_data;
            }
            Some(field) if field.len() <= MAX_KEY => field.push(b),
            Some(_) => {}
        }
    }

    fn line_end(&mut self) {
        let blank = self.field.as_ref().is_some_and(Vec::is_empty);
        if blank {
            // The event is over: the next one's data starts afresh.
            self.json.restart();
            self.has_data = false;
        }
        self.field = Some(Vec::new());
        self.in_data = false;
        self.skip_space = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reading of `body` fed in chunks of `chunk` bytes, whole.
    fn read(body: &[u8], chunk: usize) -> UsageReading {
        let mut meter = UsageMeter::new();
        for part in body.chunks(chunk.max(1)) {
            meter.feed(part);
        }
        meter.finish(true)
    }

    /// The same reading whatever the chunking.
    fn reads(body: &[u8]) -> UsageReading {
        let whole = read(body, body.len());
        for chunk in [1, 2, 3, 7, 64] {
            assert_eq!(read(body, chunk), whole, "fed in chunks of {chunk}");
        }
        whole
    }

    #[test]
    fn json_usage_of_each_api() {
        use UsageReading::*;
        assert_eq!(
            reads(br#"{"id":"x","usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#),
            Reported(15)
        );
        assert_eq!(
            reads(br#"{"usage":{"prompt_tokens":10,"completion_tokens":5}}"#),
            Reported(15)
        );
        assert_eq!(
            reads(br#" {"usage": {"input_tokens":7, "output_tokens":3}}"#),
            Reported(10)
        );
        assert_eq!(
            reads(
                br#"{"usage":{"input_tokens":7,"cache_read_input_tokens":100,"cache_creation_input_tokens":2,"output_tokens":3}}"#
            ),
            Reported(112)
        );
        assert_eq!(reads(br#"{"data":[]}"#), NoneReported);
        assert_eq!(reads(br#"{"usage":{"foo":1}}"#), NoneReported);
        assert_eq!(reads(b""), NoneReported);
    }

    #[test]
    fn usage_after_any_amount_of_content_is_read() {
        // n > 1 or logprobs: megabytes of choices before the usage at the end.
        let mut body = br#"{"choices":["#.to_vec();
        for i in 0..20_000 {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(
                br#"{"text":"a \"usage\":{\"total_tokens\":1} {[","logprobs":[0.1,0.2]}"#,
            );
        }
        body.extend_from_slice(br#"],"usage":{"total_tokens":13000}}"#);
        assert!(body.len() > 1 << 20);
        assert_eq!(read(&body, 16 * 1024), UsageReading::Reported(13000));
        assert_eq!(read(&body, 1000), UsageReading::Reported(13000));
    }

    #[test]
    fn text_that_looks_like_usage_is_not_usage() {
        // A model's output (inside a string) and nested objects' `usage` keys do not count.
        assert_eq!(
            reads(
                br#"{"content":"{\"usage\":{\"total_tokens\":1}}","usage":{"total_tokens":900}}"#
            ),
            UsageReading::Reported(900)
        );
        assert_eq!(
            reads(br#"{"choices":[{"usage":{"total_tokens":1}}],"meta":{"usage":{"total_tokens":2}}}"#),
            UsageReading::NoneReported
        );
    }

    #[test]
    fn a_cut_or_broken_body_is_unreadable() {
        let body = br#"{"choices":[],"usage":{"total_tokens":15}}"#;
        let mut meter = UsageMeter::new();
        meter.feed(&body[..20]);
        assert!(matches!(
            meter.finish(false),
            UsageReading::Unreadable { partial: None, .. }
        ));
        // Whole as far as the upstream said, but not whole JSON.
        assert!(matches!(
            reads(&body[..20]),
            UsageReading::Unreadable { partial: None, .. }
        ));
        assert!(matches!(
            reads(b"<html>bad gateway</html>"),
            UsageReading::Unreadable { partial: None, .. }
        ));
        // Usage seen, then the end missing: what was seen is kept for the charge.
        let mut meter = UsageMeter::new();
        meter.feed(body);
        assert_eq!(
            meter.finish(false),
            UsageReading::Unreadable {
                why: "the response was cut before its end, where its usage is".into(),
                partial: Some(15)
            }
        );
    }

    #[test]
    fn a_huge_usage_object_is_unreadable() {
        let mut body = br#"{"usage":{"total_tokens":5,"pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_USAGE_OBJECT));
        body.extend_from_slice(br#""}}"#);
        let got = reads(&body);
        assert!(
            matches!(&got, UsageReading::Unreadable { why, .. } if why.contains("too large")),
            "{got:?}"
        );
    }

    #[test]
    fn event_streams_of_each_api() {
        // OpenAI with include_usage: the last chunk has it.
        let openai = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                       data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n\
                       data: [DONE]\n\n";
        assert_eq!(reads(openai), UsageReading::Reported(6));
        // Anthropic: input in message_start, output in message_delta; CRLF line ends.
        let anthropic = b"event: message_start\r\n\
                          data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
                          event: content_block_delta\r\n\
                          data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"\\\"usage\\\":{\\\"output_tokens\\\":1}\"}}\r\n\r\n\
                          event: message_delta\r\n\
                          data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        assert_eq!(reads(anthropic), UsageReading::Reported(40));
        // One event's JSON over two data lines.
        assert_eq!(
            reads(b": comment\ndata: {\"usage\":\ndata: {\"total_tokens\":9}}\n\n"),
            UsageReading::Reported(9)
        );
        // A broken event does not hide a later one.
        assert_eq!(
            reads(b"data: {\"x\":[\n\ndata: {\"usage\":{\"total_tokens\":3}}\n\n"),
            UsageReading::Reported(3)
        );
    }

    #[test]
    fn an_event_stream_without_usage_is_unreadable() {
        let got =
            reads(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n");
        assert!(
            matches!(&got, UsageReading::Unreadable { why, partial: None } if why.contains("include_usage")),
            "{got:?}"
        );
        // Cut after message_start: its input is what is known.
        let mut meter = UsageMeter::new();
        meter.feed(b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\ndata: {\"type\":\"content_block_delta\"");
        assert!(matches!(
            meter.finish(false),
            UsageReading::Unreadable {
                partial: Some(26),
                ..
            }
        ));
    }
}
