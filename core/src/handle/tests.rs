use std::{collections::HashMap, time::UNIX_EPOCH};

use http::header::{AUTHORIZATION, HeaderName};

use super::*;

mod shaped;

const SECRET: &[u8] = b"sk-real-secret-value+/=";

fn cg(s: &str) -> CgroupPath {
    CgroupPath::parse(s).expect(s)
}

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn binding(cgroup: &str, host: &str) -> HandleBinding {
    HandleBinding::new(cg(cgroup), SecretName::new("API_KEY").expect("name"), host)
        .expect("binding")
}

/// Compares secret-bearing bytes without printing them.
fn same(a: &[u8], b: &[u8]) -> bool {
    a == b
}

/// A deterministic randomness source: 0, 1, 2, ... then per call an offset.
fn counter(seed: u8) -> impl FnMut(&mut [u8]) -> Result<(), HandleError> {
    let mut next = seed;
    move |buf| {
        for b in buf.iter_mut() {
            *b = next;
            next = next.wrapping_add(1);
        }
        Ok(())
    }
}

fn minted(seed: u8, cgroup: &str, host: &str) -> (String, HandleRecord) {
    let (token, record) = mint_with(
        t(1000),
        Duration::from_secs(600),
        binding(cgroup, host),
        None,
        counter(seed),
    )
    .expect("mint");
    (token.expose().to_string(), record)
}

#[test]
fn minted_tokens_have_the_documented_shape() {
    let (token, record) = mint(
        t(1000),
        DEFAULT_TTL,
        binding("agents/demo", "api.example.test"),
    )
    .expect("mint");
    let token = token.expose();
    assert_eq!(token.len(), TOKEN_PREFIX.len() + TOKEN_BODY_LEN);
    assert!(token.starts_with("brk_"));
    assert!(token[4..].bytes().all(is_token_body_byte));
    assert_eq!(record.token_hash, TokenHash::of(token));
    assert_eq!(HandleId::parse(record.id.as_str()).expect("id"), record.id);
    assert_eq!(record.created, t(1000));
    assert_eq!(record.expires, t(1000) + DEFAULT_TTL);
    assert!(!record.revoked);
    assert_eq!(record.shape, None);
    assert_eq!(
        find_tokens(token.as_bytes())
            .map(|r| (r.start, r.end))
            .collect::<Vec<_>>(),
        [(0, token.len())]
    );

    let (again, other) = mint(
        t(1000),
        DEFAULT_TTL,
        binding("agents/demo", "api.example.test"),
    )
    .expect("mint");
    assert_ne!(again.expose(), token);
    assert_ne!(other.token_hash, record.token_hash);
    assert_eq!(format!("{again:?}"), "HandleToken(<redacted>)");
    assert!(!format!("{other:?}").contains(again.expose()));
}

#[test]
fn deterministic_mint() {
    let (token, record) = minted(0, "a", "h.test");
    // base32 of bytes 0..32, lowercased.
    assert_eq!(
        token,
        format!(
            "brk_{}",
            BASE32_NOPAD
                .encode(&(0u8..32).collect::<Vec<_>>())
                .to_lowercase()
        )
    );
    assert_eq!(record.id.as_str(), "h_20212223");
    assert!(
        mint_with(
            SystemTime::UNIX_EPOCH,
            Duration::MAX,
            binding("a", "h.test"),
            None,
            counter(0)
        )
        .is_err()
    );
}

#[test]
fn minting_enforces_the_ttl_bounds_whoever_asks() {
    let at = |ttl| mint(SystemTime::now(), ttl, binding("a", "h.test"));
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(999),
        MAX_TTL + Duration::from_secs(1),
    ] {
        let err = at(ttl).expect_err("out of range");
        assert!(
            matches!(err, HandleError::TtlOutOfRange(t) if t == ttl),
            "{err}"
        );
        assert!(err.to_string().contains("365d"), "{err}");
    }
    for ttl in [Duration::from_secs(1), DEFAULT_TTL, MAX_TTL] {
        let (_, record) = at(ttl).expect("in range");
        assert_eq!(
            record.expires.duration_since(record.created).ok(),
            Some(ttl)
        );
    }
}

#[test]
fn ttl_parsing() {
    for (input, secs) in [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("2d", 172_800),
        ("1h30m", 5400),
        (" 15m ", 900),
    ] {
        assert_eq!(
            parse_ttl(input).expect(input),
            Duration::from_secs(secs),
            "{input}"
        );
    }
    for (input, why) in [
        ("", "invalid ttl \"\""),
        ("15", "time unit needed"),
        ("15x", "unknown time unit"),
        ("-1m", "invalid ttl"),
        ("0s", "at least 1s"),
        ("500ms", "at least 1s"),
        ("400d", "longest ttl is 365d"),
    ] {
        let e = parse_ttl(input).expect_err(input).to_string();
        assert!(e.contains(why), "{input}: {e}");
        assert!(
            e.ends_with("write a duration such as 30s, 15m, 1h or 2d"),
            "{e}"
        );
    }
}

#[test]
fn ids_and_hashes_parse() {
    assert!(HandleId::parse("h_0123abcd").is_ok());
    for bad in [
        "",
        "h_",
        "h_0123abc",
        "h_0123abcde",
        "h_0123ABCD",
        "x_0123abcd",
        "h_0123abcg",
    ] {
        assert!(HandleId::parse(bad).is_err(), "{bad}");
    }
    let h = TokenHash::of("brk_x");
    assert_eq!(TokenHash::from_hex(&h.to_hex()), Some(h));
    assert_eq!(h.to_hex().len(), 64);
    assert_eq!(TokenHash::from_hex("abcd"), None);
    assert_eq!(TokenHash::from_hex(&"zz".repeat(32)), None);
}

#[test]
fn binding_host_is_validated() {
    let e = HandleBinding::new(cg("a"), SecretName::new("K").expect("name"), "*")
        .expect_err("bare wildcard");
    assert!(
        e.to_string().starts_with("invalid host \"*\" for a handle"),
        "{e}"
    );
    assert_eq!(
        binding("a", "API.Example.Test").host.to_string(),
        "api.example.test"
    );
}

#[test]
fn check_has_a_distinct_reason_for_each_failure() {
    let (_, record) = minted(0, "agents/demo", "api.example.test");
    let ok = |caller: &str, host: &str, now| check(&record, &cg(caller), host, now);
    assert_eq!(ok("agents/demo", "api.example.test", t(1000)), Ok(()));
    assert_eq!(
        ok("agents/demo/tool/x", "API.example.test.", t(1599)),
        Ok(())
    );

    let e = ok("agents/demo", "api.example.test", t(1600)).expect_err("expired");
    assert!(matches!(e, HandleDenial::Expired { expired_at, .. } if expired_at == t(1600)));
    assert!(
        e.to_string().contains("expired at 1970-01-01T00:26:40Z"),
        "{e}"
    );

    for caller in ["agents", "agents/demox", "agents/other"] {
        let e = ok(caller, "api.example.test", t(1000)).expect_err(caller);
        assert!(
            matches!(&e, HandleDenial::WrongCgroup { bound, .. } if bound.as_str() == "agents/demo")
        );
        assert_eq!(
            e.to_string(),
            format!("handle {} is not valid for cgroup {caller}", record.id)
        );
    }
    for host in ["evil.test", "x.api.example.test", "example.test"] {
        let e = ok("agents/demo", host, t(1000)).expect_err(host);
        assert!(matches!(e, HandleDenial::WrongHost { .. }), "{e}");
        assert!(
            e.to_string()
                .ends_with(&format!("is not valid for host {host}"))
        );
    }

    let revoked = HandleRecord {
        revoked: true,
        ..record.clone()
    };
    // Revocation is reported first, even when other checks would fail too.
    assert_eq!(
        check(&revoked, &cg("other"), "evil.test", t(9999)),
        Err(HandleDenial::Revoked {
            id: record.id.clone()
        })
    );

    let (_, wild) = minted(9, "agents/demo", "*.example.test");
    assert!(check(&wild, &cg("agents/demo"), "a.example.test", t(1000)).is_ok());
    assert!(check(&wild, &cg("agents/demo"), "example.test", t(1000)).is_err());
}

#[test]
fn finds_tokens_only_with_clean_edges() {
    let (tok, _) = minted(0, "a", "h.test");
    let n = tok.len();
    let find = |s: &str| {
        find_tokens(s.as_bytes())
            .map(|r| (r.start, r.end))
            .collect::<Vec<_>>()
    };
    assert_eq!(find(&tok), [(0, n)]);
    assert_eq!(find(&format!("Bearer {tok}")), [(7, 7 + n)]);
    assert_eq!(find(&format!("user:{tok}")), [(5, 5 + n)]);
    assert_eq!(
        find(&format!("a={tok}&b={tok}")),
        [(2, 2 + n), (n + 5, 2 * n + 5)]
    );
    assert_eq!(find(&format!("\"{tok}\"")), [(1, 1 + n)]);
    assert_eq!(find(&format!("{tok}-x")), [(0, n)]);
    // Not tokens: glued to a word, too short, too long, wrong alphabet.
    assert!(find(&format!("x{tok}")).is_empty());
    assert!(find(&format!("x_{tok}")).is_empty());
    assert!(find(&format!("{tok}a")).is_empty());
    assert!(find(&format!("{tok}_")).is_empty());
    assert!(find(&tok[..n - 1]).is_empty());
    assert!(find(&tok.to_uppercase()).is_empty());
    assert!(find(&format!("brk_{}", "1".repeat(TOKEN_BODY_LEN))).is_empty());
    assert!(find("brk_").is_empty());
    assert!(find("").is_empty());
}

/// A store with one or more minted handles and a vault with their secret.
struct Fixture {
    records: HashMap<TokenHash, HandleRecord>,
    /// The shapes of the shaped records, each once, as brokerd passes them.
    shapes: Vec<TokenShape>,
    vault: HashMap<SecretName, Vec<u8>>,
    secret_lookups: std::cell::Cell<usize>,
    record_lookups: std::cell::Cell<usize>,
    /// Every record lookup fails (the store cannot be read).
    store_down: bool,
}

impl Fixture {
    fn new(records: &[&HandleRecord]) -> Self {
        Self::with_secret(records, SECRET)
    }

    fn with_secret(records: &[&HandleRecord], secret: &[u8]) -> Self {
        let mut shapes: Vec<TokenShape> = records.iter().filter_map(|r| r.shape.clone()).collect();
        shapes.sort();
        shapes.dedup();
        Self {
            records: records
                .iter()
                .map(|r| (r.token_hash, (*r).clone()))
                .collect(),
            shapes,
            vault: [(SecretName::new("API_KEY").expect("name"), secret.to_vec())].into(),
            secret_lookups: std::cell::Cell::new(0),
            record_lookups: std::cell::Cell::new(0),
            store_down: false,
        }
    }

    fn swap(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        cgroup: &str,
        host: &str,
    ) -> Result<Option<Swapped>, HandleDenial> {
        let cgroup = cg(cgroup);
        let ctx = SwapContext {
            cgroup: &cgroup,
            host,
            now: t(1000),
            shapes: &self.shapes,
        };
        swap_handles(
            headers,
            query,
            &ctx,
            |h| {
                self.record_lookups.set(self.record_lookups.get() + 1);
                if self.store_down {
                    return Err(LookupFailed);
                }
                Ok(self.records.get(h))
            },
            |n| {
                self.secret_lookups.set(self.secret_lookups.get() + 1);
                self.vault.get(n).map(Vec::as_slice)
            },
        )
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (n, v) in pairs {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    map
}

#[test]
fn swaps_tokens_in_headers() {
    let (tok, rec) = minted(0, "agents/demo", "api.example.test");
    let fx = Fixture::new(&[&rec]);
    let req = headers(&[
        ("authorization", &format!("Bearer {tok}")),
        ("x-api-key", &tok),
        ("accept", "text/plain"),
        ("x-multi", "one"),
        ("x-multi", &format!("two {tok}")),
    ]);
    let swapped = fx
        .swap(&req, None, "agents/demo/sub", "api.example.test")
        .expect("allowed")
        .expect("tokens found");
    let out = swapped.headers.as_ref().expect("headers changed");
    let mut want_bearer = b"Bearer ".to_vec();
    want_bearer.extend_from_slice(SECRET);
    assert!(same(out[AUTHORIZATION].as_bytes(), &want_bearer));
    assert!(out[AUTHORIZATION].is_sensitive());
    assert!(same(out["x-api-key"].as_bytes(), SECRET));
    assert_eq!(out["accept"], "text/plain");
    let multi: Vec<&[u8]> = out
        .get_all("x-multi")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    assert_eq!(multi.len(), 2);
    assert_eq!(multi[0], b"one");
    assert!(same(multi[1], &[b"two ", SECRET].concat()));
    assert_eq!(out.len(), req.len());
    // One handle, resolved once.
    assert_eq!(
        swapped.used,
        [UsedHandle {
            id: rec.id.clone(),
            secret: rec.binding.secret.clone()
        }]
    );
    assert_eq!(fx.secret_lookups.get(), 1);
    assert_eq!(swapped.secret_values.len(), 1);
    assert!(same(&swapped.secret_values[0], SECRET));
    assert!(swapped.query.is_none());
    let shown = format!("{swapped:?}");
    assert!(!shown.contains("sk-real"), "{shown}");
}

#[test]
fn swaps_tokens_inside_basic_auth() {
    let (tok, rec) = minted(0, "agents/demo", "api.example.test");
    let fx = Fixture::new(&[&rec]);
    for (user_pass, scheme) in [
        (format!("user:{tok}"), "Basic"),
        (format!("{tok}:"), "basic"),
        (format!("{tok}:x"), "BASIC"),
    ] {
        for encode in [
            BASE64.encode(user_pass.as_bytes()),
            BASE64_NOPAD.encode(user_pass.as_bytes()),
        ] {
            let req = headers(&[("authorization", &format!("{scheme} {encode}"))]);
            let swapped = fx
                .swap(&req, None, "agents/demo", "api.example.test")
                .expect("allowed")
                .expect("found");
            let value = swapped.headers.expect("changed")[AUTHORIZATION].clone();
            let (got_scheme, b64) = value.as_bytes().split_at(scheme.len() + 1);
            assert_eq!(got_scheme, format!("{scheme} ").as_bytes());
            let decoded = BASE64.decode(b64).expect("base64");
            let want = user_pass.replace(&tok, std::str::from_utf8(SECRET).expect("ascii"));
            assert!(same(&decoded, want.as_bytes()));
        }
    }
    // Basic auth without a token, or not base64, is left alone.
    let plain = headers(&[("authorization", "Basic dXNlcjpwYXNz"), ("x", "Basic !!")]);
    assert!(
        fx.swap(&plain, None, "agents/demo", "api.example.test")
            .expect("ok")
            .is_none()
    );
}

#[test]
fn swaps_tokens_in_the_query() {
    let (tok, rec) = minted(0, "agents/demo", "api.example.test");
    let fx = Fixture::new(&[&rec]);
    let encoded_secret = "sk-real-secret-value%2B%2F%3D";
    let no_headers = HeaderMap::new();
    for (query, want) in [
        (format!("key={tok}"), format!("key={encoded_secret}")),
        (
            format!("a=1&key={tok}&b=%20+x"),
            format!("a=1&key={encoded_secret}&b=%20+x"),
        ),
        // Percent-encoded token (`_` as %5F, a letter as %61): decoded, swapped, rest untouched.
        (
            format!(
                "q=a%20b&key={}",
                tok.replacen('_', "%5F", 1).replacen('a', "%61", 1)
            ),
            format!("q=a%20b&key={encoded_secret}"),
        ),
        (tok.clone(), encoded_secret.to_string()),
    ] {
        let swapped = fx
            .swap(&no_headers, Some(&query), "agents/demo", "api.example.test")
            .expect("allowed")
            .expect("found");
        assert!(swapped.headers.is_none());
        let got = swapped.query.expect("query changed");
        assert!(
            same(got.as_bytes(), want.as_bytes()),
            "query {query:?} rewritten wrongly"
        );
    }
    for untouched in ["a=1&b=2", "a=%41%zz", "x=brk_short"] {
        assert!(
            fx.swap(
                &no_headers,
                Some(untouched),
                "agents/demo",
                "api.example.test"
            )
            .expect("ok")
            .is_none()
        );
    }
}

#[test]
fn any_bad_token_denies_the_whole_request() {
    let (tok, rec) = minted(0, "agents/demo", "api.example.test");
    let (other_tok, other) = minted(100, "agents/other", "api.example.test");
    let (unknown_tok, _) = minted(200, "agents/demo", "api.example.test");
    let fx = Fixture::new(&[&rec, &other]);

    let req = headers(&[("x-api-key", &tok), ("x-other", &other_tok)]);
    let e = fx
        .swap(&req, None, "agents/demo", "api.example.test")
        .expect_err("denied");
    assert!(
        matches!(&e, HandleDenial::WrongCgroup { id, .. } if *id == other.id),
        "{e}"
    );

    let req = headers(&[("x-api-key", &unknown_tok)]);
    let e = fx
        .swap(&req, None, "agents/demo", "api.example.test")
        .expect_err("unknown");
    assert!(matches!(e, HandleDenial::Unknown { .. }));
    assert!(e.to_string().contains(&unknown_tok[..8]));
    assert!(!e.to_string().contains(&unknown_tok[..12]));

    let e = fx
        .swap(
            &HeaderMap::new(),
            Some(&format!("k={tok}")),
            "agents/demo",
            "evil.test",
        )
        .expect_err("wrong host");
    assert!(matches!(e, HandleDenial::WrongHost { .. }));
    // No secret was fetched for a failed check.
    assert_eq!(fx.secret_lookups.get(), 0);

    let mut empty_vault = Fixture::new(&[&rec]);
    empty_vault.vault.clear();
    let e = empty_vault
        .swap(
            &headers(&[("x-api-key", &tok)]),
            None,
            "agents/demo",
            "api.example.test",
        )
        .expect_err("missing secret");
    assert_eq!(
        e.to_string(),
        format!(
            "handle {} refers to secret API_KEY, which is not in the vault",
            rec.id
        )
    );
}

#[test]
fn requests_without_tokens_are_untouched() {
    let fx = Fixture::new(&[]);
    let req = headers(&[
        ("authorization", "Bearer sk-not-a-handle"),
        ("x", "brk_tooshort"),
    ]);
    assert!(
        fx.swap(&req, Some("a=b"), "agents/demo", "h.test")
            .expect("ok")
            .is_none()
    );
}

#[test]
fn apply_rewrites_request_parts() {
    let (tok, rec) = minted(0, "agents/demo", "api.example.test");
    let fx = Fixture::new(&[&rec]);
    let req = http::Request::builder()
        .uri(format!("https://api.example.test/v1/x?key={tok}&y=1"))
        .header("x-api-key", &tok)
        .body(())
        .expect("request");
    let (mut parts, ()) = req.into_parts();
    let swapped = fx
        .swap(
            &parts.headers,
            parts.uri.query(),
            "agents/demo",
            "api.example.test",
        )
        .expect("ok")
        .expect("found");
    swapped.apply(&mut parts).expect("apply");
    assert_eq!(parts.uri.path(), "/v1/x");
    assert_eq!(parts.uri.host(), Some("api.example.test"));
    assert!(same(
        parts.uri.query().unwrap_or_default().as_bytes(),
        b"key=sk-real-secret-value%2B%2F%3D&y=1"
    ));
    assert!(same(parts.headers["x-api-key"].as_bytes(), SECRET));
}
