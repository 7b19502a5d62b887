//! The generated seeds: a real TLS ClientHello (rustls) for `sniff`, and real compressed bodies
//! for `decode`. They are committed; this test checks they are what they claim to be.
//! `FUZZ_WRITE_SEEDS=1 cargo test -p agent-broker-fuzz-targets --test seeds` writes them again
//! (the ClientHello holds fresh random bytes each time).

use std::{io::Write as _, path::PathBuf, sync::Arc};

use agent_broker::fuzzing::{self as daemon, Peeked};

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(name)
}

fn writing() -> bool {
    std::env::var_os("FUZZ_WRITE_SEEDS").is_some()
}

/// What a rustls client sends first to `server_name`.
fn client_hello(server_name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("write the hello");
    out
}

#[test]
fn the_client_hello_seeds_are_real_hellos() {
    let cases = [
        (
            "client-hello-sni",
            "API.Example.com",
            Some("api.example.com"),
        ),
        ("client-hello-ip", "192.0.2.7", None),
    ];
    for (file, server_name, sni) in cases {
        let path = corpus("sniff").join(file);
        if writing() {
            std::fs::write(&path, client_hello(server_name)).expect("write");
        }
        let hello = std::fs::read(&path).expect("read the seed");
        assert_eq!(
            daemon::client_hello_sni(&hello),
            Peeked::Hello(sni.map(String::from)),
            "{file}"
        );
        assert_eq!(
            daemon::client_hello_sni(&hello[..hello.len() / 2]),
            Peeked::Incomplete
        );
    }
}

fn compress(coding: u8, plain: &[u8]) -> Vec<u8> {
    match coding {
        0 => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).expect("gzip");
            e.finish().expect("gzip")
        }
        1 => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).expect("deflate");
            e.finish().expect("deflate")
        }
        2 => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                e.write_all(plain).expect("brotli");
            }
            out
        }
        _ => zstd::encode_all(plain, 3).expect("zstd"),
    }
}

#[test]
fn the_decode_seeds_are_real_compressed_bodies() {
    let plain: Vec<u8> = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".repeat(40);
    // A bomb: 2 MiB of zeros, far past the target's ratio cap.
    let bomb = vec![0u8; 2 << 20];
    for (coding, name) in [(0u8, "gzip"), (1, "deflate"), (2, "br"), (3, "zstd")] {
        for (body, kind, chunk) in [(&plain, "sse", 3u8), (&bomb, "bomb", 255)] {
            let path = corpus("decode").join(format!("{name}-{kind}"));
            let mut seed = vec![coding, chunk];
            seed.extend(compress(coding, body));
            if writing() {
                std::fs::write(&path, &seed).expect("write");
            }
            assert_eq!(
                std::fs::read(&path).expect("read the seed"),
                seed,
                "{name}-{kind}"
            );
            let input = &seed[2..];
            let chunks: Vec<&[u8]> = input.chunks(usize::from(chunk) * 16).collect();
            let limits = daemon::DecodeLimits {
                max_decoded: 3 << 20,
                max_ratio: 50,
            };
            let (out, end) = daemon::decode_capped(
                [
                    daemon::Coding::Gzip,
                    daemon::Coding::Deflate,
                    daemon::Coding::Brotli,
                    daemon::Coding::Zstd,
                ][usize::from(coding)],
                limits,
                &chunks,
            );
            if kind == "sse" {
                assert_eq!((out, end), (plain.len() as u64, daemon::DecodeEnd::Done));
            } else {
                assert_eq!(end, daemon::DecodeEnd::Bomb, "{name}");
            }
        }
    }
}
