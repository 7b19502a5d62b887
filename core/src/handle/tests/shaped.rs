//! Shaped tokens: shape derivation, random bodies, recognition and swapping.

use super::*;
use crate::test_rng::Rng;

/// `n` characters drawn from `from` (test secrets are made here, never written out).
fn draw(rng: &mut Rng, from: &[u8], n: usize) -> String {
    (0..n)
        .map(|_| char::from(from[rng.below(from.len())]))
        .collect()
}

const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A `ghp_`-like test secret: the prefix and 36 letters and digits (with each kind present).
fn gh_like(rng: &mut Rng) -> String {
    format!("ghp_Aa0{}", draw(rng, ALNUM, 33))
}

fn shape_of(secret: &str) -> TokenShape {
    TokenShape::of_secret(secret.as_bytes()).expect("shape")
}

fn shaped_minted(secret: &str, seed: u8, cgroup: &str, host: &str) -> (String, HandleRecord) {
    let (token, record) = mint_with(
        t(1000),
        Duration::from_secs(600),
        binding(cgroup, host),
        Some(shape_of(secret)),
        counter(seed),
    )
    .expect("mint");
    (token.expose().to_string(), record)
}

#[test]
fn shapes_keep_the_prefix_length_and_alphabet() {
    let mut rng = Rng(0x05AB_ED01);
    let b64url = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-";
    let b64 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/";
    let cases: Vec<(String, &str, Alphabet)> = vec![
        (gh_like(&mut rng), "ghp_", Alphabet::Alnum),
        (
            format!(
                "github_pat_11{}_{}",
                draw(&mut rng, ALNUM, 20),
                draw(&mut rng, ALNUM, 59)
            ),
            "github_pat_",
            Alphabet::AlnumUnderscore,
        ),
        (
            format!("sk-proj-X_-{}", draw(&mut rng, b64url, 120)),
            "sk-proj-",
            Alphabet::Base64Url,
        ),
        (
            format!("sk-ant-api03-Q_-{}", draw(&mut rng, b64url, 90)),
            "sk-ant-api03-",
            Alphabet::Base64Url,
        ),
        // The number after `xoxb-` is not a label: a segment starts with a letter.
        (
            format!(
                "xoxb-{}-{}-{}",
                draw(&mut rng, b"0123456789", 10),
                draw(&mut rng, b"0123456789", 13),
                draw(&mut rng, ALNUM, 24)
            ),
            "xoxb-",
            Alphabet::AlnumDash,
        ),
        (
            draw(&mut rng, b"0123456789abcdef", 40),
            "",
            Alphabet::HexLower,
        ),
        (
            draw(&mut rng, b"0123456789ABCDEF", 32),
            "",
            Alphabet::HexUpper,
        ),
        (draw(&mut rng, b"0123456789", 40), "", Alphabet::Digits),
        (
            format!("Z+/{}", draw(&mut rng, b64, 37)),
            "",
            Alphabet::Base64,
        ),
        // A segment is at most 8 characters; the prefix at most 16.
        (
            format!("abcdefghi_{}", draw(&mut rng, ALNUM, 30)),
            "",
            Alphabet::AlnumUnderscore,
        ),
        (
            format!("aaaaaaaa-bbbbbbbb-{}", draw(&mut rng, UPPER, 30)),
            "aaaaaaaa-",
            Alphabet::AlnumDash,
        ),
        (
            format!("sk-ant-admin01-B{}", draw(&mut rng, ALNUM, 40)),
            "sk-ant-admin01-",
            Alphabet::Alnum,
        ),
        // Uppercase labels are not prefixes.
        (
            format!("GOCSPX-{}", draw(&mut rng, UPPER, 28)),
            "",
            Alphabet::AlnumDash,
        ),
    ];
    for (secret, prefix, alphabet) in cases {
        let shape = shape_of(&secret);
        let what = format!("{shape}");
        assert_eq!(shape.prefix(), prefix, "{what}");
        assert_eq!(shape.alphabet(), alphabet, "{what}");
        assert_eq!(shape.len(), secret.len(), "{what}");
        assert!(shape.fits(secret.as_bytes()), "{what}");
        assert!(shape.random_bits() >= MIN_RANDOM_BITS, "{what}");
        assert_eq!(TokenShape::parse(&what), Ok(shape.clone()), "{what}");
        // The written shape holds the prefix and nothing else of the secret.
        assert!(!what.contains(&secret[prefix.len()..prefix.len() + 4]));
    }
    assert_eq!(
        shape_of(&format!("ghp_Aa0{}", "b".repeat(33))).to_string(),
        "ghp_[0-9A-Za-z]{36}"
    );
}

#[test]
fn secrets_without_a_usable_shape_are_refused_with_reasons() {
    let mut rng = Rng(0x05AB_ED02);
    // GitLab's glpat- + 20 characters carries only 120 random bits.
    let short = format!("glpat-Q{}", draw(&mut rng, b"abcdefgh", 19));
    let e = TokenShape::of_secret(short.as_bytes()).expect_err("short");
    assert!(
        matches!(e, ShapeError::TooShort { ref prefix, body_len: 20, bits: 119, .. } if prefix == "glpat-"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the secret is too short to copy: 20 characters of [0-9A-Za-z] after its prefix \
         `glpat-` carry 119 random bits, and a token needs at least 128"
    );
    assert!(!e.to_string().contains(&short[7..]));
    // 21 hex digits, no prefix: 84 bits.
    let e = TokenShape::of_secret(draw(&mut rng, b"0123456789abcdef", 21).as_bytes())
        .expect_err("short hex");
    assert!(e.to_string().contains("(it has none)"), "{e}");
    assert!(TokenShape::of_secret(b"").is_err());
    assert!(TokenShape::of_secret(b"ghp_").is_err());

    for bad in [
        format!(
            "sk-{}.{}",
            draw(&mut rng, ALNUM, 30),
            draw(&mut rng, ALNUM, 30)
        ),
        format!("{}==", draw(&mut rng, ALNUM, 40)),
        format!(
            "{} {}",
            draw(&mut rng, ALNUM, 20),
            draw(&mut rng, ALNUM, 20)
        ),
        format!(
            "{}_{}+",
            draw(&mut rng, ALNUM, 20),
            draw(&mut rng, ALNUM, 20)
        ),
        format!("ghp_{}é", draw(&mut rng, ALNUM, 36)),
    ] {
        let e = TokenShape::of_secret(bad.as_bytes()).expect_err("alphabet");
        assert!(matches!(e, ShapeError::Alphabet { .. }), "{e:?}");
        assert!(e.to_string().contains("no token alphabet has"), "{e}");
        assert!(!e.to_string().contains(&bad[4..12]), "{e}");
    }
}

#[test]
fn written_shapes_parse_strictly() {
    for good in [
        "ghp_[0-9A-Za-z]{36}",
        "[0-9a-f]{40}",
        "sk-proj-[0-9A-Za-z_-]{156}",
        "[0-9A-Za-z+/]{40}",
    ] {
        assert_eq!(
            TokenShape::parse(good).expect(good).to_string(),
            good,
            "{good}"
        );
    }
    for bad in [
        "",
        "ghp_",
        "ghp_[0-9A-Za-z]{36",
        "ghp_[0-9A-Za-z]36",
        "ghp_[0-9A-Za-z]{}",
        "ghp_[0-9A-Za-z]{3x}",
        "ghp_[0-9A-Za-z]{-36}",
        "ghp_[a-z]{36}",
        "ghp_[0-9A-Za-z]{36}x",
        "ghp_[0-9A-Za-z]{99999999999999999999999}",
        // Not a prefix a secret could have given.
        "GHP_[0-9A-Za-z]{36}",
        "ghp[0-9A-Za-z]{36}",
        "toolongsegment_[0-9A-Za-z]{36}",
        // Too few random bits.
        "ghp_[0-9A-Za-z]{21}",
        "[0-9a-f]{31}",
    ] {
        assert!(TokenShape::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        TokenShape::parse("[0-9a-f]{32}").map(|s| s.random_bits()),
        Ok(128)
    );
    assert_eq!(
        TokenShape::parse("ghp_[0-9A-Za-z]{22}").map(|s| s.random_bits()),
        Ok(130)
    );
}

/// Draws a secret of a random shape: maybe a prefix of label segments, a body from a random
/// alphabet, long enough to carry 128 bits.
fn random_secret(rng: &mut Rng) -> String {
    let prefixes = [
        "",
        "ghp_",
        "github_pat_",
        "sk-proj-",
        "sk-",
        "xoxb-",
        "ab1-c_",
    ];
    let prefix = prefixes[rng.below(prefixes.len())];
    let alphabet = Alphabet::ALL[rng.below(Alphabet::ALL.len())];
    let chars = alphabet.chars();
    let min = (128.0 / (chars.len() as f64).log2()).ceil() as usize;
    // The body starts with a digit or uppercase letter where the alphabet has one, so it is
    // never read as one more label segment.
    let first: Vec<u8> = chars
        .iter()
        .copied()
        .filter(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        .collect();
    let n = min + rng.below(60);
    format!(
        "{prefix}{}{}",
        draw(rng, &first, 1),
        draw(rng, chars, n - 1)
    )
}

#[test]
fn random_tokens_fit_their_shape_and_carry_nothing_of_the_secret_but_the_prefix() {
    let mut rng = Rng(0x05AB_ED03);
    for _ in 0..500 {
        let secret = random_secret(&mut rng);
        let shape = shape_of(&secret);
        let what = shape.to_string();
        assert!(shape.fits(secret.as_bytes()), "{what}");
        let token = placeholder(&shape).expect("placeholder");
        let token = token.expose();
        assert!(shape.fits(token.as_bytes()), "{what}");
        assert_ne!(token, secret, "{what}");
        assert_eq!(
            shape.find_in(token.as_bytes()),
            vec![Range {
                start: 0,
                end: token.len()
            }],
            "{what}"
        );

        // The token is a function of the shape and the randomness only: another secret of
        // the same shape gives the same token from the same random bytes.
        // (Shuffled after its first character: the same characters, so the same alphabet.)
        let seed = rng.next();
        let mut other: Vec<u8> = secret.as_bytes().to_vec();
        let body = &mut other[shape.prefix().len() + 1..];
        for i in (1..body.len()).rev() {
            body.swap(i, rng.below(i + 1));
        }
        let other_shape = TokenShape::of_secret(&other).expect("same shape");
        assert_eq!(other_shape, shape, "{what}");
        let from = |shape: &TokenShape| {
            let mut source = Rng(seed);
            shape::random_token(shape, |buf: &mut [u8]| {
                for b in buf.iter_mut() {
                    *b = source.next() as u8;
                }
                Ok::<(), HandleError>(())
            })
            .expect("token")
        };
        assert_eq!(*from(&shape), *from(&other_shape), "{what}");
    }
}

#[test]
fn random_bodies_draw_every_character_evenly() {
    for alphabet in Alphabet::ALL {
        let shape = TokenShape::parse(&format!("{}{{400}}", alphabet.class())).expect("shape");
        let mut counts = HashMap::new();
        for _ in 0..20 {
            let token = placeholder(&shape).expect("token");
            for b in token.expose().bytes() {
                *counts.entry(b).or_insert(0usize) += 1;
            }
        }
        let chars = alphabet.chars();
        assert_eq!(counts.len(), chars.len(), "{}", alphabet.class());
        // 8000 draws: each character's expected count is 8000/len; allow a wide margin.
        let expected = 8000 / chars.len();
        for (&b, &n) in &counts {
            assert!(alphabet.contains(b));
            assert!(
                n > expected / 2 && n < expected * 2,
                "{}: {} drawn {n} times, expected about {expected}",
                alphabet.class(),
                char::from(b)
            );
        }
    }
    // Bytes that would bias the draw are skipped: with 10 digits, 250..=255 are drawn again.
    let digits = TokenShape::parse("[0-9]{40}").expect("shape");
    let mut calls = 0;
    let token = shape::random_token(&digits, |buf: &mut [u8]| {
        calls += 1;
        buf.fill(if calls == 1 { 255 } else { 7 });
        Ok::<(), HandleError>(())
    })
    .expect("token");
    assert_eq!(*token, "7".repeat(40));
    assert_eq!(calls, 2);
}

#[test]
fn shaped_candidates_need_clean_edges() {
    let mut rng = Rng(0x05AB_ED04);
    let secret = gh_like(&mut rng);
    let shape = shape_of(&secret);
    let tok = placeholder(&shape).expect("token").expose().to_string();
    let n = tok.len();
    let find = |s: &str| {
        shape
            .find_in(s.as_bytes())
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect::<Vec<_>>()
    };
    assert_eq!(find(&format!("Bearer {tok}")), [(7, 7 + n)]);
    assert_eq!(find(&format!("user:{tok}")), [(5, 5 + n)]);
    assert_eq!(
        find(&format!("a={tok}&b={tok}")),
        [(2, 2 + n), (n + 5, 2 * n + 5)]
    );
    assert_eq!(find(&format!("\"{tok}\"")), [(1, 1 + n)]);
    assert_eq!(find(&format!("{tok}-x")), [(0, n)]);
    assert!(find(&format!("x{tok}")).is_empty());
    assert!(find(&format!("_{tok}")).is_empty());
    assert!(find(&format!("{tok}a")).is_empty());
    assert!(find(&format!("{tok}_")).is_empty());
    assert!(find(&tok[..n - 1]).is_empty());
    assert!(find(&format!("{}-{}", &tok[..n - 1], "x")).is_empty());
    assert!(find(&tok.replace("ghp_", "gho_")).is_empty());

    // Without a prefix: exactly a run of the shape's length.
    let hex = TokenShape::parse("[0-9a-f]{40}").expect("shape");
    let h = placeholder(&hex).expect("token").expose().to_string();
    let find_hex = |s: &str| hex.find_in(s.as_bytes());
    assert_eq!(
        find_hex(&format!("k={h}&x=1")),
        vec![Range { start: 2, end: 42 }]
    );
    assert_eq!(find_hex(&format!("{h} {h}")), [0..40, 41..81]);
    assert!(find_hex(&format!("{h}0")).is_empty());
    assert!(find_hex(&format!("g{h}")).is_empty());
    assert!(find_hex(&h[1..]).is_empty());
    assert!(find_hex(&h.to_uppercase()).is_empty());
}

#[test]
fn minted_shaped_handles_look_like_the_secret() {
    let mut rng = Rng(0x05AB_ED05);
    let secret = gh_like(&mut rng);
    let shape = shape_of(&secret);
    let (token, record) = mint_shaped(
        t(1000),
        DEFAULT_TTL,
        binding("agents/demo", "api.example.test"),
        shape.clone(),
    )
    .expect("mint");
    let token = token.expose();
    assert!(token.starts_with("ghp_"));
    assert_eq!(token.len(), secret.len());
    assert!(shape.fits(token.as_bytes()));
    assert_ne!(token, secret);
    assert_eq!(record.token_hash, TokenHash::of(token));
    assert_eq!(record.shape, Some(shape.clone()));
    assert!(find_tokens(token.as_bytes()).next().is_none());
    let (again, _) = mint_shaped(
        t(1000),
        DEFAULT_TTL,
        binding("agents/demo", "api.example.test"),
        shape,
    )
    .expect("mint");
    assert_ne!(again.expose(), token);
    assert_eq!(format!("{again:?}"), "HandleToken(<redacted>)");
}

#[test]
fn shaped_handles_are_swapped_wherever_brk_tokens_are() {
    let mut rng = Rng(0x05AB_ED06);
    let secret = gh_like(&mut rng);
    let (tok, rec) = shaped_minted(&secret, 0, "agents/demo", "api.example.test");
    let fx = Fixture::with_secret(&[&rec], secret.as_bytes());
    let req = headers(&[
        ("authorization", &format!("Bearer {tok}")),
        ("x-api-key", &tok),
        ("accept", "text/plain"),
    ]);
    let swapped = fx
        .swap(&req, None, "agents/demo/sub", "api.example.test")
        .expect("allowed")
        .expect("found");
    let out = swapped.headers.as_ref().expect("headers changed");
    assert!(same(
        out[AUTHORIZATION].as_bytes(),
        format!("Bearer {secret}").as_bytes()
    ));
    assert!(out[AUTHORIZATION].is_sensitive());
    assert!(same(out["x-api-key"].as_bytes(), secret.as_bytes()));
    assert_eq!(out["accept"], "text/plain");
    assert_eq!(swapped.used.len(), 1);
    assert_eq!(swapped.used[0].id, rec.id);
    assert_eq!(fx.secret_lookups.get(), 1);

    // Basic auth, both paddings.
    for user_pass in [format!("user:{tok}"), format!("{tok}:")] {
        for encode in [
            BASE64.encode(user_pass.as_bytes()),
            BASE64_NOPAD.encode(user_pass.as_bytes()),
        ] {
            let req = headers(&[("authorization", &format!("Basic {encode}"))]);
            let swapped = fx
                .swap(&req, None, "agents/demo", "api.example.test")
                .expect("allowed")
                .expect("found");
            let value = swapped.headers.expect("changed")[AUTHORIZATION].clone();
            let decoded = BASE64.decode(&value.as_bytes()[6..]).expect("base64");
            assert!(same(&decoded, user_pass.replace(&tok, &secret).as_bytes()));
        }
    }

    // The query, raw and percent-encoded.
    for query in [
        format!("key={tok}&b=%20+x"),
        format!("key={}&b=%20+x", tok.replacen('_', "%5F", 1)),
        format!("key={}&b=%20+x", tok.replacen('g', "%67", 1)),
    ] {
        let swapped = fx
            .swap(
                &HeaderMap::new(),
                Some(&query),
                "agents/demo",
                "api.example.test",
            )
            .expect("allowed")
            .expect("found");
        let got = swapped.query.expect("query changed");
        assert!(
            same(got.as_bytes(), format!("key={secret}&b=%20+x").as_bytes()),
            "query rewritten wrongly"
        );
    }
}

#[test]
fn misused_shaped_handles_are_denied_like_brk_ones() {
    let mut rng = Rng(0x05AB_ED07);
    let secret = gh_like(&mut rng);
    let (tok, rec) = shaped_minted(&secret, 0, "agents/demo", "api.example.test");
    let revoked_secret = gh_like(&mut rng);
    let (revoked_tok, mut revoked) =
        shaped_minted(&revoked_secret, 50, "agents/demo", "api.example.test");
    revoked.revoked = true;
    let (old_tok, mut old) = shaped_minted(&secret, 100, "agents/demo", "api.example.test");
    old.expires = t(999);
    let fx = Fixture::with_secret(&[&rec, &revoked, &old], secret.as_bytes());
    let key = |t: &str| headers(&[("x-api-key", t)]);

    let e = fx
        .swap(&key(&tok), None, "agents/demo", "evil.test")
        .expect_err("wrong host");
    assert!(
        matches!(e, HandleDenial::WrongHost { ref id, .. } if *id == rec.id),
        "{e}"
    );
    assert!(
        e.to_string().ends_with("is not valid for host evil.test"),
        "{e}"
    );
    let e = fx
        .swap(&key(&tok), None, "agents/other", "api.example.test")
        .expect_err("wrong cgroup");
    assert!(matches!(e, HandleDenial::WrongCgroup { .. }), "{e}");
    let e = fx
        .swap(&key(&old_tok), None, "agents/demo", "api.example.test")
        .expect_err("expired");
    assert!(matches!(e, HandleDenial::Expired { .. }), "{e}");
    let e = fx
        .swap(&key(&revoked_tok), None, "agents/demo", "api.example.test")
        .expect_err("revoked");
    assert!(matches!(e, HandleDenial::Revoked { .. }), "{e}");
    // In the query or basic auth as well; a good handle beside a bad one does not help.
    let e = fx
        .swap(
            &key(&tok),
            Some(&format!("k={tok}&j={revoked_tok}")),
            "agents/demo",
            "api.example.test",
        )
        .expect_err("revoked in query");
    assert!(matches!(e, HandleDenial::Revoked { .. }), "{e}");
    let basic = BASE64.encode(format!("u:{tok}").as_bytes());
    let e = fx
        .swap(
            &headers(&[("authorization", &format!("Basic {basic}"))]),
            None,
            "agents/demo",
            "evil.test",
        )
        .expect_err("basic, wrong host");
    assert!(matches!(e, HandleDenial::WrongHost { .. }), "{e}");
    // No secret was fetched for a denied request.
    assert_eq!(fx.secret_lookups.get(), 0);
    // The denial names the handle, never the token.
    assert!(!e.to_string().contains(&tok[4..]), "{e}");
}

#[test]
fn tokens_of_the_same_shape_that_no_handle_has_are_left_alone() {
    let mut rng = Rng(0x05AB_ED08);
    let secret = gh_like(&mut rng);
    let (tok, rec) = shaped_minted(&secret, 0, "agents/demo", "api.example.test");
    let fx = Fixture::with_secret(&[&rec], secret.as_bytes());
    // A real-looking token the agent holds of its own, of the very same shape.
    let unrelated = gh_like(&mut rng);
    assert!(
        rec.shape
            .as_ref()
            .is_some_and(|s| s.fits(unrelated.as_bytes()))
    );
    let req = headers(&[
        ("authorization", &format!("token {unrelated}")),
        ("x-other", &unrelated),
    ]);
    let q = format!("a={unrelated}");
    assert!(
        fx.swap(&req, Some(&q), "agents/demo", "evil.test")
            .expect("not a handle, not denied")
            .is_none()
    );
    assert!(fx.record_lookups.get() >= 1);
    // Beside a handle: only the handle is swapped, the other token is kept byte for byte.
    let req = headers(&[
        ("authorization", &format!("token {unrelated}")),
        ("x-api-key", &tok),
    ]);
    let swapped = fx
        .swap(&req, Some(&q), "agents/demo", "api.example.test")
        .expect("allowed")
        .expect("found");
    let out = swapped.headers.expect("changed");
    assert_eq!(
        out[AUTHORIZATION].as_bytes(),
        format!("token {unrelated}").as_bytes()
    );
    assert!(same(out["x-api-key"].as_bytes(), secret.as_bytes()));
    assert!(swapped.query.is_none());
    // Unknown `brk_` tokens are still refused: they can only be mistyped or deleted handles.
    let (brk, _) = minted(7, "agents/demo", "api.example.test");
    let e = fx
        .swap(
            &headers(&[("x", &brk)]),
            None,
            "agents/demo",
            "api.example.test",
        )
        .expect_err("unknown brk_");
    assert!(matches!(e, HandleDenial::Unknown { .. }), "{e}");
}

#[test]
fn a_store_that_cannot_be_read_denies_any_candidate() {
    let mut rng = Rng(0x05AB_ED09);
    let secret = gh_like(&mut rng);
    let (tok, rec) = shaped_minted(&secret, 0, "agents/demo", "api.example.test");
    let (brk, brk_rec) = minted(0, "agents/demo", "api.example.test");
    let mut fx = Fixture::with_secret(&[&rec, &brk_rec], secret.as_bytes());
    fx.store_down = true;
    for token in [&tok, &brk, &gh_like(&mut rng)] {
        let e = fx
            .swap(
                &headers(&[("x-api-key", token)]),
                None,
                "agents/demo",
                "api.example.test",
            )
            .expect_err("store down");
        assert_eq!(e, HandleDenial::Unavailable);
    }
    // Nothing that looks like a token: nothing to look up, nothing refused.
    assert!(
        fx.swap(
            &headers(&[("x-api-key", "short")]),
            None,
            "agents/demo",
            "api.example.test"
        )
        .expect("ok")
        .is_none()
    );
    assert_eq!(fx.secret_lookups.get(), 0);
}

#[test]
fn handles_of_several_shapes_and_kinds_in_one_request() {
    let mut rng = Rng(0x05AB_ED0A);
    let secret = gh_like(&mut rng);
    let (gh_tok, gh) = shaped_minted(&secret, 0, "agents/demo", "api.example.test");
    let hex_secret = format!("F{}", draw(&mut rng, b"0123456789ABCDEF", 39));
    let (hex_tok, hex) = shaped_minted(&hex_secret, 60, "agents/demo", "api.example.test");
    let (brk, brk_rec) = minted(120, "agents/demo", "api.example.test");
    assert_eq!(hex.shape.as_ref().map(|s| s.prefix()), Some(""));
    let fx = Fixture::with_secret(&[&gh, &hex, &brk_rec], secret.as_bytes());
    assert_eq!(fx.shapes.len(), 2);
    let req = headers(&[("x-a", &format!("{gh_tok},{hex_tok};{brk}"))]);
    let swapped = fx
        .swap(&req, None, "agents/demo", "api.example.test")
        .expect("allowed")
        .expect("found");
    // One secret in the fixture's vault stands for all three.
    assert!(same(
        swapped.headers.expect("changed")["x-a"].as_bytes(),
        format!("{secret},{secret};{secret}").as_bytes()
    ));
    assert_eq!(swapped.used.len(), 3);
    assert_eq!(fx.secret_lookups.get(), 3);
}

#[test]
fn unrelated_tokens_are_never_swapped_nor_refused() {
    // Property: with shaped handles stored, a request made only of random text and random
    // tokens that were never minted (of the stored shapes among them) is left alone.
    let mut rng = Rng(0x05AB_ED0B);
    let mut records = Vec::new();
    let mut secrets = Vec::new();
    for seed in 0..6u8 {
        let secret = random_secret(&mut rng);
        records.push(shaped_minted(&secret, seed * 40, "agents/demo", "api.example.test").1);
        secrets.push(secret);
    }
    let refs: Vec<&HandleRecord> = records.iter().collect();
    let fx = Fixture::with_secret(&refs, b"unused");
    let noise = b"abcXYZ019 _-+/=:;,.&%\"'";
    for _ in 0..300 {
        let shape = &fx.shapes[rng.below(fx.shapes.len())];
        let stranger = placeholder(shape).expect("token");
        let mut value = String::from_utf8(rng.bytes(noise)).expect("ascii");
        value.push_str(stranger.expose());
        value.push_str(&String::from_utf8(rng.bytes(noise)).expect("ascii"));
        let value = value.trim().to_string();
        let Ok(header) = HeaderValue::from_str(&value) else {
            continue;
        };
        let mut req = HeaderMap::new();
        req.insert("x-api-key", header);
        let query = value.replace(['&', '%', ' ', '"'], "");
        let got = fx
            .swap(&req, Some(&query), "agents/demo", "api.example.test")
            .unwrap_or_else(|e| panic!("a stranger was refused: {e}"));
        assert!(got.is_none(), "a stranger was swapped");
    }
    assert_eq!(fx.secret_lookups.get(), 0);
}
