//! The generator of the `audit` and `proxy` seed corpora: each seed is built here, field by
//! field, in the layout the target reads (src/audit.rs, src/proxy.rs), so a change of layout is
//! one edit here. The committed seeds must be what this generates;
//! `FUZZ_WRITE_SEEDS=1 cargo test -p agent-broker-fuzz-targets --test structured_seeds` writes
//! them again (and removes seeds it no longer makes).

use std::path::PathBuf;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(name)
}

fn writing() -> bool {
    std::env::var_os("FUZZ_WRITE_SEEDS").is_some()
}

/// Writes (when asked) and checks the seeds of `target`.
fn check(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = corpus(target);
    if writing() {
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for entry in std::fs::read_dir(&dir).expect("corpus dir") {
            std::fs::remove_file(entry.expect("entry").path()).expect("remove an old seed");
        }
        for (name, seed) in seeds {
            std::fs::write(dir.join(name), seed).expect("write a seed");
        }
    }
    let mut committed: Vec<String> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    committed.sort();
    let mut made: Vec<String> = seeds.iter().map(|(n, _)| n.to_string()).collect();
    made.sort();
    assert_eq!(committed, made, "fuzz/corpus/{target}/ holds other seeds");
    for (name, seed) in seeds {
        let on_disk = std::fs::read(dir.join(name)).expect("read a seed");
        assert!(
            on_disk == *seed,
            "fuzz/corpus/{target}/{name} is not what the generator makes"
        );
    }
}

/// A length byte and the bytes (`max` is the target's bound: the length is taken modulo it).
fn short(out: &mut Vec<u8>, bytes: &[u8], max: u8) {
    assert!(
        bytes.len() < usize::from(max),
        "a short field over its bound"
    );
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

// --- audit ---------------------------------------------------------------------------------

/// One event: `shape` bit 3 adds a decision, reason and side; bit 5 a request id, secrets
/// and tokens.
fn event(out: &mut Vec<u8>, shape: u8, host: &str, path: &str) {
    out.push(shape);
    out.extend_from_slice(&1_700_000_000u32.to_be_bytes());
    short(out, b"agents/demo", 24);
    short(out, b"POST", 12);
    short(out, host.as_bytes(), 32);
    short(out, path.as_bytes(), 48);
    out.extend_from_slice(&200u16.to_be_bytes());
    out.extend_from_slice(&512u16.to_be_bytes());
    out.extend_from_slice(&4096u32.to_be_bytes());
    if shape & 0x08 != 0 {
        short(out, "denied: no rule \u{2014} \"quoted\"\n".as_bytes(), 64);
    }
    if shape & 0x20 != 0 {
        out.extend_from_slice(&77u32.to_be_bytes());
        short(out, b"OPENAI_KEY", 16);
        short(out, b"", 16);
        out.extend_from_slice(&1234u16.to_be_bytes());
    }
}

/// A log of `n` events (batches ended after the events whose bit is set in `cuts`), then the
/// corruptions.
fn log(n: u8, cuts: u16, ops: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![n];
    out.extend_from_slice(&cuts.to_be_bytes());
    for i in 0..n {
        let shape = [0x00, 0x08, 0x20, 0x28, 0x19, 0x6a][usize::from(i) % 6];
        event(&mut out, shape, "api.openai.com", &format!("/v1/chat/{i}"));
    }
    for op in ops {
        out.extend_from_slice(op);
    }
    out
}

#[test]
fn the_audit_seeds_are_generated() {
    let seeds = vec![
        ("empty-log", log(0, 0, &[])),
        ("one-batch", log(3, 0, &[])),
        ("three-batches", log(6, 0b01_0010, &[])),
        ("record-bit-flip", log(4, 0b10, &[&[0, 1, 0, 40, 3]])),
        ("record-truncated", log(4, 0, &[&[1, 2, 0, 30]])),
        ("record-deleted", log(5, 0, &[&[2, 2]])),
        ("last-record-deleted", log(5, 0, &[&[2, 4]])),
        ("records-swapped", log(4, 0, &[&[3, 0, 3]])),
        ("record-renumbered", log(4, 0, &[&[4, 1, 9]])),
        ("record-forged", log(4, 0b1, &[&[5, 1, 0, 20]])),
        (
            "file-bit-flip",
            log(3, 0, &[&[6, 0, 0, 0x30, 0x00, 0, 0, 5]]),
        ),
        (
            "file-truncated",
            log(3, 0, &[&[7, 0, 0, 0x40, 0x00, 0, 0, 0]]),
        ),
        (
            "file-zeroed",
            log(3, 0, &[&[8, 0, 0, 0x00, 0x80, 0x02, 0x00, 0]]),
        ),
        ("swap-then-swap-back", log(3, 0, &[&[3, 0, 1], &[3, 0, 1]])),
        (
            "forged-and-deleted",
            log(6, 0b100, &[&[5, 2, 0, 9], &[2, 5]]),
        ),
    ];
    check("audit", &seeds);
}

// --- proxy ---------------------------------------------------------------------------------

/// A request: method index (8 or 9 modulo 10: the method's bytes follow), host choice (0: the rule's,
/// 6: another, 7: text), path, headers (a pick byte: low nibble a listed name or 13+ for
/// bytes, high nibble a listed value or 9+ for bytes), body chunks.
struct Req<'a> {
    method: u8,
    host: u8,
    path: &'a [u8],
    headers: &'a [(u8, &'a [u8], &'a [u8])],
    body: &'a [&'a [u8]],
}

/// An answer: status, headers, codings (indexes into gzip, deflate, br, zstd, identity,
/// bogus, lying), SSE, pieces (tag, data), frame sizes, early end.
struct Resp<'a> {
    status: u16,
    headers: &'a [(&'a [u8], &'a [u8])],
    codings: &'a [u8],
    sse: bool,
    pieces: &'a [(u8, &'a [u8])],
    frames: &'a [u8],
    short: Option<u8>,
}

fn request(out: &mut Vec<u8>, tag: u8, req: &Req<'_>, resp: &Resp<'_>) {
    assert_ne!(tag % 8, 7, "tag 7 is a raw exchange");
    out.push(tag);
    out.push(req.method);
    if req.method % 10 >= 8 {
        short(out, b"PURGE", 12);
    }
    out.push(req.host);
    if req.host % 8 == 7 {
        short(out, b"API.example.test:443", 32);
    }
    short(out, req.path, 64);
    out.push(req.headers.len() as u8);
    for (pick, name, value) in req.headers {
        out.push(*pick);
        if pick % 16 >= 13 {
            short(out, name, 24);
        }
        if pick >> 4 >= 9 {
            short(out, value, 64);
        }
    }
    out.push(req.body.len() as u8);
    for chunk in req.body {
        short(out, chunk, 255);
    }
    out.extend_from_slice(&(resp.status - 200).to_be_bytes());
    out.push(resp.headers.len() as u8);
    for (name, value) in resp.headers {
        short(out, name, 24);
        short(out, value, 48);
    }
    let shape = resp.codings.len() as u8
        | if resp.sse { 0x04 } else { 0 }
        | if resp.short.is_some() { 0x08 } else { 0 };
    out.push(shape);
    out.extend_from_slice(resp.codings);
    out.push(resp.pieces.len() as u8);
    for (tag, data) in resp.pieces {
        out.push(*tag);
        match tag % 12 {
            0..=3 => short(out, data, 128),
            10 | 11 => out.extend_from_slice(data),
            _ => {}
        }
    }
    out.push(resp.frames.len() as u8);
    out.extend_from_slice(resp.frames);
    if let Some(extra) = resp.short {
        out.push(extra);
    }
}

fn raw(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(7);
    short(out, bytes, 255);
}

const GET: Req<'static> = Req {
    method: 0,
    host: 0,
    path: b"v1/models",
    headers: &[(0, b"", b"")],
    body: &[],
};

const ECHO: Resp<'static> = Resp {
    status: 200,
    headers: &[],
    codings: &[],
    sse: false,
    pieces: &[(0, b"{\"key\":\""), (4, b""), (0, b"\"}")],
    frames: &[],
    short: None,
};

fn one(flags: u8, req: &Req<'_>, resp: &Resp<'_>) -> Vec<u8> {
    let mut out = vec![flags];
    request(&mut out, 0, req, resp);
    out
}

#[test]
fn the_proxy_seeds_are_generated() {
    let post = Req {
        method: 1,
        host: 0,
        path: b"v1/chat/completions?stream=true",
        headers: &[
            (0x10, b"", b""),
            (0x39, b"", b""),
            (0x9d, b"x-trace", b"abc"),
        ],
        body: &[b"{\"model\":\"m\",", b"\"stream\":true}"],
    };
    let sse = Resp {
        sse: true,
        pieces: &[
            (1, b"{\"delta\":\"hel\"}"),
            (10, &[0, 20]),
            (11, &[20, 40]),
            (2, b"[DONE]"),
        ],
        frames: &[7, 1, 1, 30],
        ..ECHO
    };
    let coded = |codings: &'static [u8]| Resp {
        codings,
        frames: &[5, 5],
        ..ECHO
    };
    let mut seeds = vec![
        ("h1-h1-echo", one(0, &GET, &ECHO)),
        ("h2-h2-echo", one(3, &GET, &ECHO)),
        ("h1-h2-sse", one(1, &post, &sse)),
        ("h2-h1-sse", one(2, &post, &sse)),
        ("gzip", one(0, &GET, &coded(&[0]))),
        ("deflate", one(0, &GET, &coded(&[1]))),
        ("br", one(3, &GET, &coded(&[2]))),
        ("zstd", one(3, &GET, &coded(&[3]))),
        ("stacked-gzip-br", one(0, &GET, &coded(&[0, 2]))),
        ("bogus-coding", one(0, &GET, &coded(&[5]))),
        ("lying-gzip", one(3, &GET, &coded(&[6]))),
        (
            "echo-encoded-header-trailer",
            one(
                3,
                &GET,
                &Resp {
                    status: 401,
                    headers: &[(b"www-authenticate", b"Bearer realm=\"x\"")],
                    pieces: &[(5, b""), (6, b""), (7, b""), (8, b""), (9, b"")],
                    ..ECHO
                },
            ),
        ),
        (
            "early-close",
            one(
                0,
                &GET,
                &Resp {
                    short: Some(100),
                    frames: &[3],
                    ..ECHO
                },
            ),
        ),
        (
            "other-host-and-custom-method",
            one(
                0,
                &Req {
                    method: 8,
                    host: 6,
                    ..GET
                },
                &ECHO,
            ),
        ),
    ];
    let mut keep_alive = vec![0u8];
    request(&mut keep_alive, 0, &GET, &ECHO);
    request(&mut keep_alive, 1, &post, &sse);
    request(&mut keep_alive, 2, &GET, &coded(&[0]));
    seeds.push(("keep-alive-three", keep_alive));
    let mut raw_then_request = vec![2u8];
    raw(
        &mut raw_then_request,
        b"GET /v1 HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    raw(&mut raw_then_request, b"GARBAGE\r\n\r\n");
    request(&mut raw_then_request, 0, &Req { host: 7, ..GET }, &ECHO);
    seeds.push(("raw-smuggling-then-request", raw_then_request));
    check("proxy", &seeds);
}
