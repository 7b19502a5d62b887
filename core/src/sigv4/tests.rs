//! SigV4 against AWS's published vectors: the SigV4 test suite (as aws-c-auth ships it, in
//! `tests/aws-signing-test-suite/v4/`; the expected canonical requests and signatures are
//! transcribed below), and the S3 examples of "Authenticating Requests: Using the Authorization
//! Header" and "Transferring Payload in Multiple Chunks". Then verification, re-signing, and the
//! chunk re-signer fed in random slices.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;
use crate::test_rng::Rng;

/// The test suite's credentials, date and scope.
const SUITE_AKID: &str = "AKIDEXAMPLE";
const SUITE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SUITE_DATE: &str = "20150830T123600Z";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The S3 examples' credentials and date.
const S3_AKID: &str = "AKIAIOSFODNN7EXAMPLE";
const S3_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const S3_DATE: &str = "20130524T000000Z";

fn secret(s: &str) -> SecretValue {
    SecretValue::from_string(s.to_owned()).expect("a valid secret")
}

fn creds(akid: &str, secret_key: &str, token: Option<&str>) -> Credentials {
    Credentials {
        access_key_id: akid.to_owned(),
        secret_access_key: secret(secret_key),
        session_token: token.map(secret),
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
            HeaderValue::from_str(value).expect("a header value"),
        );
    }
    map
}

fn date(text: &str) -> AmzDate {
    AmzDate::parse(text).expect("a valid date")
}

fn suite_scope() -> Scope {
    Scope {
        date: "20150830".into(),
        region: "us-east-1".into(),
        service: "service".into(),
    }
}

/// The signed header names of `map`: every header, lowercase, sorted, once.
fn all_names(map: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = map.keys().map(|k| k.as_str().to_owned()).collect();
    names.sort();
    names.dedup();
    names
}

/// One test-suite case: the request as the suite gives it (plus the X-Amz-Date the signer
/// adds), its canonical request and its signature.
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
    uri: UriPath,
    payload_hash: &'static str,
    canonical: &'static str,
    signature: &'static str,
}

const VANILLA_CANONICAL: &str = "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const VANILLA_SIGNATURE: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
const HOST: (&str, &str) = ("host", "example.amazonaws.com");

/// A GET of `path` with only the host header, whose canonical request differs from
/// get-vanilla's in the URI only.
const fn get_path(
    name: &'static str,
    path: &'static str,
    uri: UriPath,
    canonical: &'static str,
    signature: &'static str,
) -> Case {
    Case {
        name,
        method: "GET",
        path,
        query: None,
        headers: &[HOST],
        uri,
        payload_hash: EMPTY_SHA256,
        canonical,
        signature,
    }
}

const CASES: &[Case] = &[
    get_path(
        "get-vanilla",
        "/",
        UriPath::Normalize,
        VANILLA_CANONICAL,
        VANILLA_SIGNATURE,
    ),
    Case {
        name: "get-vanilla-query-order-key-case",
        query: Some("Param2=value2&Param1=value1"),
        canonical: "GET\n/\nParam1=value1&Param2=value2\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "get-vanilla-query-order-encoded",
        query: Some("Param-3=Value3&Param=Value2&%E1%88%B4=Value1"),
        canonical: "GET\n/\n%E1%88%B4=Value1&Param=Value2&Param-3=Value3\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "get-vanilla-utf8-query",
        query: Some("\u{1234}=bar"),
        canonical: "GET\n/\n%E1%88%B4=bar\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "get-vanilla-query-unreserved",
        query: Some(
            "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        ),
        canonical: "GET\n/\n-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "get-header-value-trim",
        headers: &[
            HOST,
            ("my-header1", " value1"),
            ("my-header2", " \"a   b   c\""),
        ],
        canonical: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nmy-header2:\"a b c\"\nx-amz-date:20150830T123600Z\n\nhost;my-header1;my-header2;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "get-header-key-duplicate",
        headers: &[
            HOST,
            ("my-header1", "value2"),
            ("my-header1", "value2"),
            ("my-header1", "value1"),
        ],
        canonical: "GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value2,value2,value1\nx-amz-date:20150830T123600Z\n\nhost;my-header1;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "get-vanilla-with-session-token",
        headers: &[
            HOST,
            (
                "x-amz-security-token",
                "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267",
            ),
        ],
        canonical: "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\nx-amz-security-token:6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267\n\nhost;x-amz-date;x-amz-security-token\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "post-vanilla-empty-query-value",
        method: "POST",
        query: Some("Param1=value1"),
        canonical: "POST\n/\nParam1=value1\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        signature: "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    Case {
        name: "post-x-www-form-urlencoded",
        method: "POST",
        headers: &[
            ("content-type", "application/x-www-form-urlencoded"),
            HOST,
            ("content-length", "13"),
            (
                "x-amz-content-sha256",
                "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
            ),
        ],
        payload_hash: "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        canonical: "POST\n/\n\ncontent-length:13\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\nx-amz-content-sha256:9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e\nx-amz-date:20150830T123600Z\n\ncontent-length;content-type;host;x-amz-content-sha256;x-amz-date\n9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        signature: "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
        ..get_path("", "/", UriPath::Normalize, "", "")
    },
    // Normalized paths (every service but S3).
    get_path(
        "get-slash-dot-slash-normalized",
        "/./",
        UriPath::Normalize,
        VANILLA_CANONICAL,
        VANILLA_SIGNATURE,
    ),
    get_path(
        "get-relative-relative-normalized",
        "/example1/example2/../..",
        UriPath::Normalize,
        VANILLA_CANONICAL,
        VANILLA_SIGNATURE,
    ),
    get_path(
        "get-slashes-normalized",
        "//example//",
        UriPath::Normalize,
        "GET\n/example/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
    ),
    get_path(
        "get-slash-pointless-dot-normalized",
        "/./example",
        UriPath::Normalize,
        "GET\n/example\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
    ),
    get_path(
        "get-space-normalized",
        "/example space/",
        UriPath::Normalize,
        "GET\n/example%20space/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    ),
    get_path(
        "get-utf8",
        "/\u{1234}",
        UriPath::Normalize,
        "GET\n/%E1%88%B4\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    ),
    get_path(
        "get-unreserved",
        "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
        UriPath::Normalize,
        "GET\n/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
    ),
    // Unnormalized paths, as S3 takes them.
    get_path(
        "get-slashes-unnormalized",
        "//example//",
        UriPath::AsSent,
        "GET\n//example//\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "87cca117541a147f6df867677d98a7d80dff226d2bfca9e4ffa899665623c7e5",
    ),
    get_path(
        "get-slash-dot-slash-unnormalized",
        "/./",
        UriPath::AsSent,
        "GET\n/./\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "68714168e6557f8f2de0ef956fc24dc2593a4bd2961f8df51898d8a134695145",
    ),
    get_path(
        "get-relative-unnormalized",
        "/example/..",
        UriPath::AsSent,
        "GET\n/example/..\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "eca7ead57bb5aa5c8e28007acd4ff04e1ff9a0ff3b237ec1554a184887ff9282",
    ),
];

impl Case {
    fn headers(&self) -> HeaderMap {
        let mut map = headers(self.headers);
        map.insert(X_AMZ_DATE, HeaderValue::from_static(SUITE_DATE));
        map
    }
}

#[test]
fn test_suite_canonical_requests_and_signatures() {
    for case in CASES {
        let map = case.headers();
        let request = Request {
            method: case.method,
            path: case.path,
            query: case.query,
            headers: &map,
        };
        let canonical = canonical_request(&request, &all_names(&map), case.payload_hash, case.uri)
            .expect("all signed headers present");
        assert_eq!(
            String::from_utf8_lossy(&canonical),
            case.canonical,
            "{}",
            case.name
        );
        let sig = signature(
            &secret(SUITE_SECRET),
            &date(SUITE_DATE),
            &suite_scope(),
            &canonical,
        );
        assert_eq!(sig, case.signature, "{}", case.name);
    }
}

#[test]
fn test_suite_string_to_sign() {
    // get-vanilla's header-string-to-sign.txt.
    assert_eq!(
        string_to_sign(
            &date(SUITE_DATE),
            &suite_scope(),
            VANILLA_CANONICAL.as_bytes()
        ),
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    );
}

/// `case`'s request with the Authorization header the suite's signed request carries.
fn suite_signed_headers(case: &Case) -> HeaderMap {
    let mut map = case.headers();
    let auth = Authorization {
        access_key_id: SUITE_AKID.into(),
        scope: suite_scope(),
        signed_headers: all_names(&map),
        signature: case.signature.into(),
    };
    map.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&auth.to_header_string()).expect("a header value"),
    );
    map
}

#[test]
fn test_suite_requests_verify() {
    // The service-named cases (the unnormalized ones are S3's rule, which `service` does not use).
    for case in CASES.iter().filter(|c| c.uri == UriPath::Normalize) {
        let map = suite_signed_headers(case);
        let signed = parse_request(&map).expect(case.name);
        let token = map
            .get(X_AMZ_SECURITY_TOKEN)
            .map(|v| v.to_str().expect("text"));
        let request = Request {
            method: case.method,
            path: case.path,
            query: case.query,
            headers: &map,
        };
        verify(
            &request,
            &signed,
            &creds(SUITE_AKID, SUITE_SECRET, token),
            case.payload_hash,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
}

#[test]
fn authorization_round_trips_the_suites_header() {
    let value = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;my-header1;x-amz-date, Signature=c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea";
    let auth = Authorization::parse(value.as_bytes()).expect("valid");
    assert_eq!(auth.access_key_id, "AKIDEXAMPLE");
    assert_eq!(auth.scope, suite_scope());
    assert_eq!(auth.signed_headers, ["host", "my-header1", "x-amz-date"]);
    assert_eq!(
        auth.signature,
        "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea"
    );
    assert_eq!(auth.to_header_string(), value);
    // Any order, no spaces after the commas.
    let reordered = "AWS4-HMAC-SHA256 Signature=c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea,SignedHeaders=host;my-header1;x-amz-date,Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
    assert_eq!(
        Authorization::parse(reordered.as_bytes()).expect("valid"),
        auth
    );
}

#[test]
fn malformed_authorization_headers_say_what_is_wrong() {
    const SIG: &str = "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea";
    let cred = "Credential=AKID/20150830/us-east-1/iam/aws4_request";
    for (value, expected) in [
        (
            "Bearer abc".to_string(),
            "the Authorization header is not SigV4: its scheme is \"Bearer\", expected AWS4-HMAC-SHA256",
        ),
        (
            format!("AWS4-ECDSA-P256-SHA256 {cred}"),
            "the Authorization header is not SigV4: its scheme is \"AWS4-ECDSA-P256-SHA256\", expected AWS4-HMAC-SHA256",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=host;x-amz-date"),
            "malformed Authorization header: no Signature= component",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, {cred}, SignedHeaders=host, Signature={SIG}"),
            "malformed Authorization header: Credential= appears more than once",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=host, Signature={SIG},"),
            "malformed Authorization header: an empty component (two commas in a row, or a trailing comma)",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=host, Signature={SIG}, Extra=1"),
            "malformed Authorization header: an unknown component (expected Credential=, SignedHeaders= and Signature=)",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/iam, SignedHeaders=host, Signature={SIG}"
            ),
            "malformed Authorization header: Credential= must have five parts: access key id/date/region/service/aws4_request",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 Credential=AKID/2015-08-30/us-east-1/iam/aws4_request, SignedHeaders=host, Signature={SIG}"
            ),
            "malformed Authorization header: the date in Credential= is not YYYYMMDD",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 Credential=AKID/20150830//iam/aws4_request, SignedHeaders=host, Signature={SIG}"
            ),
            "malformed Authorization header: the region in Credential= is empty or not [a-z0-9-]",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 Credential=AKID/20150830/us-east-1/iam/aws5_request, SignedHeaders=host, Signature={SIG}"
            ),
            "malformed Authorization header: Credential= does not end in /aws4_request",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=x-amz-date;host, Signature={SIG}"),
            "malformed Authorization header: SignedHeaders= is not sorted, or names a header twice",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=Host;x-amz-date, Signature={SIG}"),
            "malformed Authorization header: SignedHeaders= must be lowercase header names separated by ';', none empty",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=x-amz-date, Signature={SIG}"),
            "malformed Authorization header: SignedHeaders= does not include host",
        ),
        (
            format!(
                "AWS4-HMAC-SHA256 {cred}, SignedHeaders=host, Signature={}",
                SIG.to_uppercase()
            ),
            "malformed Authorization header: Signature= is not 64 lowercase hex digits",
        ),
        (
            format!("AWS4-HMAC-SHA256 {cred}, SignedHeaders=host, Signature=abc"),
            "malformed Authorization header: Signature= is not 64 lowercase hex digits",
        ),
    ] {
        let e = Authorization::parse(value.as_bytes()).expect_err(&value);
        assert_eq!(e.to_string(), expected, "{value}");
        assert!(!e.to_string().contains("AKID"), "{e}");
    }
}

#[test]
fn request_headers_are_read_and_checked() {
    let case = &CASES[0];
    let mut map = suite_signed_headers(case);
    let signed = parse_request(&map).expect("valid");
    assert_eq!(signed.date.as_str(), SUITE_DATE);
    assert_eq!(signed.date.day(), "20150830");
    assert_eq!(signed.content_sha256, None);
    assert!(!signed.has_security_token);
    assert_eq!(signed.uri_path(), UriPath::Normalize);

    map.insert(X_AMZ_DATE, HeaderValue::from_static("20150831T000000Z"));
    assert_eq!(parse_request(&map), Err(ParseError::ScopeDate));
    map.insert(X_AMZ_DATE, HeaderValue::from_static("2015-08-30T12:36:00Z"));
    assert!(matches!(parse_request(&map), Err(ParseError::Date { .. })));
    map.remove(X_AMZ_DATE);
    assert_eq!(parse_request(&map), Err(ParseError::NoDate));
    map.insert(X_AMZ_DATE, HeaderValue::from_static(SUITE_DATE));
    map.append(X_AMZ_DATE, HeaderValue::from_static(SUITE_DATE));
    assert_eq!(
        parse_request(&map),
        Err(ParseError::Repeated { name: "X-Amz-Date" })
    );
    map.insert(X_AMZ_DATE, HeaderValue::from_static(SUITE_DATE));
    map.insert(X_AMZ_CONTENT_SHA256, HeaderValue::from_static("abc"));
    assert!(matches!(
        parse_request(&map),
        Err(ParseError::ContentSha256 { .. })
    ));
    map.insert(
        X_AMZ_CONTENT_SHA256,
        HeaderValue::from_static("STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
    );
    map.insert(X_AMZ_SECURITY_TOKEN, HeaderValue::from_static("token"));
    let signed = parse_request(&map).expect("valid");
    assert_eq!(signed.content_sha256, Some(PayloadHash::StreamingSigned));
    assert_eq!(
        signed.declared_payload_hash(),
        Some("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    );
    assert!(signed.has_security_token);
    map.remove(http::header::AUTHORIZATION);
    assert_eq!(parse_request(&map), Err(ParseError::NoAuthorization));
}

#[test]
fn payload_hash_values() {
    for (value, expected) in [
        ("UNSIGNED-PAYLOAD", PayloadHash::Unsigned),
        (
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            PayloadHash::StreamingSigned,
        ),
        (
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
            PayloadHash::StreamingSignedTrailer,
        ),
        (
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            PayloadHash::StreamingUnsignedTrailer,
        ),
        (EMPTY_SHA256, PayloadHash::Sha256(EMPTY_SHA256.into())),
    ] {
        let parsed = PayloadHash::parse(value.as_bytes()).expect(value);
        assert_eq!(parsed, expected);
        assert_eq!(parsed.as_str(), value);
    }
    for bad in [
        "",
        "unsigned-payload",
        "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD",
        &EMPTY_SHA256[1..],
        &format!("{}g", &EMPTY_SHA256[1..]),
    ] {
        assert!(PayloadHash::parse(bad.as_bytes()).is_err(), "{bad}");
    }
}

#[test]
fn amz_dates() {
    let d = date("20150830T123600Z");
    assert_eq!(d.unix_secs(), 1_440_938_160);
    assert_eq!(AmzDate::from_unix_secs(1_440_938_160), d);
    assert_eq!(date("20240229T235959Z").day(), "20240229");
    for bad in [
        "20150830T123600",
        "20150830 123600Z",
        "20150832T123600Z",
        "20150229T000000Z",
        "20151301T000000Z",
        "20150830T243600Z",
        "2015083aT123600Z",
        "19691231T235959Z",
        "+0150830T123600Z",
    ] {
        assert!(AmzDate::parse(bad).is_err(), "{bad}");
    }
    let signed = parse_request(&suite_signed_headers(&CASES[0])).expect("valid");
    let at = d.unix_secs();
    assert_eq!(
        check_clock_skew(&signed, at + 900, MAX_CLOCK_SKEW_SECS),
        Ok(())
    );
    assert_eq!(
        check_clock_skew(&signed, at - 901, MAX_CLOCK_SKEW_SECS),
        Err(VerifyError::ClockSkew {
            skew_secs: 901,
            max_secs: 900
        })
    );
}

/// The S3 example "GET Object" (Authenticating Requests: Using the Authorization Header).
#[test]
fn s3_get_object_example() {
    let map = headers(&[
        ("host", "examplebucket.s3.amazonaws.com"),
        ("range", "bytes=0-9"),
        ("x-amz-content-sha256", EMPTY_SHA256),
        ("x-amz-date", S3_DATE),
        (
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
    ]);
    let signed = parse_request(&map).expect("valid");
    assert_eq!(signed.uri_path(), UriPath::AsSent);
    let request = Request {
        method: "GET",
        path: "/test.txt",
        query: None,
        headers: &map,
    };
    let hash = signed.declared_payload_hash().expect("declared");
    verify(&request, &signed, &creds(S3_AKID, S3_SECRET, None), hash).expect("verifies");
}

/// The chunked upload example's request (Transferring Payload in Multiple Chunks).
fn s3_chunked_request_headers() -> HeaderMap {
    headers(&[
        ("host", "s3.amazonaws.com"),
        ("x-amz-date", S3_DATE),
        ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
        (
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;x-amz-storage-class,Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
        ),
        ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
        ("content-encoding", "aws-chunked"),
        ("x-amz-decoded-content-length", "66560"),
        ("content-length", "66824"),
    ])
}

const S3_CHUNKED_PATH: &str = "/examplebucket/chunkObject.txt";
/// The example's chunk signatures: 65536 bytes, 1024 bytes, and the final empty chunk.
const S3_CHUNK_SIGNATURES: [&str; 3] = [
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
];

/// An `aws-chunked` body of `sizes` chunks of 'a' (then the final empty one) with `signatures`.
fn chunked_body(sizes: &[usize], signatures: &[String]) -> Vec<u8> {
    let mut body = Vec::new();
    for (size, sig) in sizes.iter().chain([&0]).zip(signatures) {
        body.extend_from_slice(format!("{size:x};chunk-signature={sig}\r\n").as_bytes());
        body.extend(std::iter::repeat_n(b'a', *size));
        body.extend_from_slice(b"\r\n");
    }
    body
}

/// The signatures of chunks of 'a' of `sizes` (then the final empty one) along `chain`.
fn chain_signatures(mut chain: ChunkChain, sizes: &[usize]) -> Vec<String> {
    use sha2::{Digest as _, Sha256};
    sizes
        .iter()
        .chain([&0])
        .map(|&size| chain.next_signature(&Sha256::digest(vec![b'a'; size]).into()))
        .collect()
}

fn s3_chunked_verified() -> (HeaderMap, SignedRequest, ChunkChain) {
    let map = s3_chunked_request_headers();
    let signed = parse_request(&map).expect("valid");
    let request = Request {
        method: "PUT",
        path: S3_CHUNKED_PATH,
        query: None,
        headers: &map,
    };
    let hash = signed.declared_payload_hash().expect("declared").to_owned();
    let chain =
        verify(&request, &signed, &creds(S3_AKID, S3_SECRET, None), &hash).expect("seed verifies");
    (map, signed, chain)
}

#[test]
fn s3_chunked_example_seed_and_chunk_signatures() {
    let (_, _, chain) = s3_chunked_verified();
    assert_eq!(
        chain.previous_signature(),
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
    );
    assert_eq!(chain_signatures(chain, &[65536, 1024]), S3_CHUNK_SIGNATURES);
}

/// Feeds `body` to `resigner` in slices of random sizes (1 byte up to a little over a chunk).
fn feed_in_slices(
    resigner: &mut ChunkResigner,
    body: &[u8],
    rng: &mut Rng,
) -> Result<Vec<u8>, ChunkError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let len = match rng.below(4) {
            0 => 1 + rng.below(8),
            1 => 1 + rng.below(200),
            2 => 1 + rng.below(5000),
            _ => 1 + rng.below(70_000),
        }
        .min(body.len() - at);
        resigner.feed(&body[at..at + len], &mut out)?;
        at += len;
    }
    resigner.finish()?;
    Ok(out)
}

const REAL_AKID: &str = "AKIAREALREALREAL0001";
const REAL_SECRET: &str = "real/secret+access+key/0123456789abcdefghij";

/// The docs' body, signed with the example key (the agent's placeholder), re-signed with
/// another key: every chunk signature is the one the real key's chain gives, the rest of the
/// body is unchanged, whatever slices the body comes in.
#[test]
fn s3_chunked_example_resigned_in_random_slices() {
    let (map, signed, agent_chain) = s3_chunked_verified();
    let request = Request {
        method: "PUT",
        path: S3_CHUNKED_PATH,
        query: None,
        headers: &map,
    };
    let hash = signed.declared_payload_hash().expect("declared");
    let real = creds(REAL_AKID, REAL_SECRET, Some("real-session-token"));
    let resigned = sign(&request, &signed, &real, hash, None).expect("signs");
    let sizes = [65536, 1024];
    let agent_body = chunked_body(&sizes, &S3_CHUNK_SIGNATURES.map(String::from));
    assert_eq!(agent_body.len(), 66824, "the example's Content-Length");
    let expected = chunked_body(&sizes, &chain_signatures(resigned.chunks.clone(), &sizes));
    assert_ne!(expected, agent_body);

    let mut rng = Rng(0x5167_4A11);
    for _ in 0..40 {
        let mut resigner = ChunkResigner::new(
            &PayloadHash::StreamingSigned,
            agent_chain.clone(),
            resigned.chunks.clone(),
            DEFAULT_MAX_CHUNK,
        )
        .expect("signed chunks");
        let out = feed_in_slices(&mut resigner, &agent_body, &mut rng).expect("re-signs");
        assert_eq!(out.len(), agent_body.len());
        assert!(out == expected, "re-signed body differs");
    }

    // Re-signed with the same key, the body comes out as it went in.
    let mut same = ChunkResigner::new(
        &PayloadHash::StreamingSigned,
        agent_chain.clone(),
        agent_chain,
        DEFAULT_MAX_CHUNK,
    )
    .expect("signed chunks");
    let out = feed_in_slices(&mut same, &agent_body, &mut rng).expect("re-signs");
    assert!(out == agent_body, "identity re-signing changed the body");
}

#[test]
fn chunks_are_emitted_as_each_completes() {
    let (_, _, chain) = s3_chunked_verified();
    let body = chunked_body(&[65536, 1024], &S3_CHUNK_SIGNATURES.map(String::from));
    let mut resigner = ChunkResigner::new(
        &PayloadHash::StreamingSigned,
        chain.clone(),
        chain,
        DEFAULT_MAX_CHUNK,
    )
    .expect("signed chunks");
    let first_len = 88 + 65536 + 2;
    let mut out = Vec::new();
    resigner.feed(&body[..first_len - 1], &mut out).expect("ok");
    assert!(out.is_empty(), "nothing before the first chunk's CRLF");
    resigner
        .feed(&body[first_len - 1..first_len], &mut out)
        .expect("ok");
    assert_eq!(out.len(), first_len);
    assert_eq!(
        resigner.finish(),
        Err(ChunkError::Truncated {
            at: "before the final zero-size chunk"
        })
    );
    resigner.feed(&body[first_len..], &mut out).expect("ok");
    resigner.finish().expect("complete");
    assert!(out == body);
    assert_eq!(resigner.feed(b"x", &mut out), Err(ChunkError::AfterFinal));
    assert_eq!(resigner.feed(b"x", &mut out), Err(ChunkError::Failed));
}

#[test]
fn bad_chunks_are_refused() {
    let (_, _, chain) = s3_chunked_verified();
    let sigs = S3_CHUNK_SIGNATURES.map(String::from);
    let resigner = |max| {
        ChunkResigner::new(
            &PayloadHash::StreamingSigned,
            chain.clone(),
            chain.clone(),
            max,
        )
        .expect("signed chunks")
    };
    let run = |body: &[u8], max| {
        let mut r = resigner(max);
        let mut out = Vec::new();
        r.feed(body, &mut out)?;
        r.finish().map(|()| out)
    };
    let good = chunked_body(&[65536, 1024], &sigs);

    // A wrong signature on chunk 1; chunk 0 was already emitted, chunk 1 is not.
    let mut wrong = sigs.clone();
    wrong[1] = sigs[0].clone();
    let body = chunked_body(&[65536, 1024], &wrong);
    let mut r = resigner(DEFAULT_MAX_CHUNK);
    let mut out = Vec::new();
    assert_eq!(
        r.feed(&body, &mut out),
        Err(ChunkError::Signature { chunk: 1 })
    );
    assert_eq!(out.len(), 88 + 65536 + 2);

    // Data changed after signing.
    let mut tampered = good.clone();
    tampered[100] = b'b';
    assert_eq!(
        run(&tampered, DEFAULT_MAX_CHUNK),
        Err(ChunkError::Signature { chunk: 0 })
    );

    // Chunks out of order (the chain fixes the order).
    let swapped = chunked_body(&[1024, 65536], &sigs);
    assert_eq!(
        run(&swapped, DEFAULT_MAX_CHUNK),
        Err(ChunkError::Signature { chunk: 0 })
    );

    // Larger than the bound: refused at its header, before any data is held.
    assert_eq!(
        run(&good[..100], 65535),
        Err(ChunkError::TooLarge {
            chunk: 0,
            size: 65536,
            max: 65535
        })
    );

    // Truncated, and bytes after the end.
    assert_eq!(
        run(&good[..good.len() - 1], DEFAULT_MAX_CHUNK),
        Err(ChunkError::Truncated {
            at: "before a chunk's closing CRLF"
        })
    );
    assert_eq!(
        run(&good[..1000], DEFAULT_MAX_CHUNK),
        Err(ChunkError::Truncated {
            at: "inside a chunk's data"
        })
    );
    assert_eq!(
        run(&good[..10], DEFAULT_MAX_CHUNK),
        Err(ChunkError::Truncated {
            at: "inside a chunk header"
        })
    );
    let mut extra = good.clone();
    extra.extend_from_slice(b"0");
    assert_eq!(run(&extra, DEFAULT_MAX_CHUNK), Err(ChunkError::AfterFinal));

    // Malformed headers and framing.
    let sig = &sigs[0];
    for (body, reason) in [
        (
            "10000\r\n".to_string(),
            "no ;chunk-signature= after the size",
        ),
        (
            format!("10000;chunk-signature={sig}\n"),
            "the line does not end in CRLF",
        ),
        (
            format!(";chunk-signature={sig}\r\n"),
            "the size is not 1 to 16 hex digits",
        ),
        (
            format!("1000g;chunk-signature={sig}\r\n"),
            "the size is not hex",
        ),
        (
            format!("10000;chunk-sig={sig}\r\n"),
            "the extension is not chunk-signature=",
        ),
        (
            format!("10000;chunk-signature={}\r\n", &sig[1..]),
            "the chunk signature is not 64 lowercase hex digits",
        ),
        (
            format!("10000;chunk-signature={}\r\n", sig.to_uppercase()),
            "the chunk signature is not 64 lowercase hex digits",
        ),
    ] {
        assert_eq!(
            run(body.as_bytes(), DEFAULT_MAX_CHUNK),
            Err(ChunkError::Header { chunk: 0, reason }),
            "{body}"
        );
    }
    assert_eq!(
        run(&[b'1'; MAX_CHUNK_HEADER + 1], DEFAULT_MAX_CHUNK),
        Err(ChunkError::HeaderTooLong { chunk: 0 })
    );
    let mut no_crlf = good.clone();
    no_crlf[88 + 65536] = b'x';
    assert_eq!(
        run(&no_crlf, DEFAULT_MAX_CHUNK),
        Err(ChunkError::MissingCrlf { chunk: 0 })
    );
}

#[test]
fn only_signed_chunk_bodies_get_a_resigner() {
    let (_, _, chain) = s3_chunked_verified();
    let new = |mode: PayloadHash| {
        ChunkResigner::new(&mode, chain.clone(), chain.clone(), DEFAULT_MAX_CHUNK).map(|_| ())
    };
    assert_eq!(new(PayloadHash::StreamingSigned), Ok(()));
    assert_eq!(
        new(PayloadHash::StreamingSignedTrailer),
        Err(ChunkError::TrailersUnsupported)
    );
    assert_eq!(
        new(PayloadHash::StreamingUnsignedTrailer),
        Err(ChunkError::NotSignedChunks {
            mode: "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
        })
    );
    assert_eq!(
        new(PayloadHash::Unsigned),
        Err(ChunkError::NotSignedChunks {
            mode: "UNSIGNED-PAYLOAD"
        })
    );
}

/// A request the agent signed with the placeholder, as an SDK would.
struct AgentRequest {
    headers: HeaderMap,
    method: &'static str,
    path: &'static str,
    query: Option<&'static str>,
}

impl AgentRequest {
    fn request(&self) -> Request<'_> {
        Request {
            method: self.method,
            path: self.path,
            query: self.query,
            headers: &self.headers,
        }
    }
}

fn agent_signed(placeholder: &Credentials, path: &'static str, service: &str) -> AgentRequest {
    let mut map = headers(&[
        ("host", "example.amazonaws.com"),
        ("x-amz-date", SUITE_DATE),
        ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
        ("x-amz-meta-note", "  two   words "),
    ]);
    if let Some(token) = &placeholder.session_token {
        map.insert(
            X_AMZ_SECURITY_TOKEN,
            HeaderValue::from_bytes(token.expose()).expect("a header value"),
        );
    }
    let scope = Scope {
        service: service.into(),
        ..suite_scope()
    };
    let agent = AgentRequest {
        headers: map,
        method: "PUT",
        path,
        query: Some("partNumber=1&uploadId=a%2Fb"),
    };
    let names = all_names(&agent.headers);
    let canonical = canonical_request(
        &agent.request(),
        &names,
        "UNSIGNED-PAYLOAD",
        UriPath::for_service(service),
    )
    .expect("headers present");
    let sig = signature(
        &placeholder.secret_access_key,
        &date(SUITE_DATE),
        &scope,
        &canonical,
    );
    let auth = Authorization {
        access_key_id: placeholder.access_key_id.clone(),
        scope,
        signed_headers: names,
        signature: sig,
    };
    let mut agent = agent;
    agent.headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&auth.to_header_string()).expect("a header value"),
    );
    agent
}

fn placeholder() -> Credentials {
    creds(
        "AKIAPLACEHOLDER00001",
        "placeholder/secret/known/to/the/broker/00",
        None,
    )
}

#[test]
fn tampered_requests_do_not_verify() {
    let ph = placeholder();
    for service in ["s3", "dynamodb"] {
        let agent = agent_signed(&ph, "/bucket/a%20key", service);
        let signed = parse_request(&agent.headers).expect("valid");
        verify(&agent.request(), &signed, &ph, "UNSIGNED-PAYLOAD").expect("untouched verifies");

        let check = |request: Request<'_>, payload: &str| {
            verify(&request, &signed, &ph, payload).map(|_| ())
        };
        let base = agent.request();
        assert_eq!(
            check(
                Request {
                    method: "GET",
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Err(VerifyError::Signature)
        );
        assert_eq!(
            check(
                Request {
                    path: "/bucket/other",
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Err(VerifyError::Signature)
        );
        assert_eq!(
            check(
                Request {
                    query: Some("partNumber=2&uploadId=a%2Fb"),
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Err(VerifyError::Signature)
        );
        assert_eq!(
            check(
                Request {
                    query: None,
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Err(VerifyError::Signature)
        );
        assert_eq!(check(base, EMPTY_SHA256), Err(VerifyError::Signature));
        let mut changed = agent.headers.clone();
        changed.insert("x-amz-meta-note", HeaderValue::from_static("other"));
        assert_eq!(
            check(
                Request {
                    headers: &changed,
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Err(VerifyError::Signature)
        );
        // Unsigned headers may change; whitespace in signed ones is canonicalized away.
        let mut changed = agent.headers.clone();
        changed.insert("user-agent", HeaderValue::from_static("other"));
        changed.insert("x-amz-meta-note", HeaderValue::from_static("two words"));
        assert_eq!(
            check(
                Request {
                    headers: &changed,
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Ok(())
        );
        let mut missing = agent.headers.clone();
        missing.remove("x-amz-meta-note");
        assert_eq!(
            check(
                Request {
                    headers: &missing,
                    ..base
                },
                "UNSIGNED-PAYLOAD"
            ),
            Err(VerifyError::MissingSignedHeader {
                name: "x-amz-meta-note".into()
            })
        );

        // Another secret, another access key id.
        let other_secret = creds(
            &ph.access_key_id,
            "another/secret/0000000000000000000000000",
            None,
        );
        assert_eq!(
            verify(&base, &signed, &other_secret, "UNSIGNED-PAYLOAD").map(|_| ()),
            Err(VerifyError::Signature)
        );
        let other_id = creds(
            "AKIAOTHER",
            "placeholder/secret/known/to/the/broker/00",
            None,
        );
        assert_eq!(
            verify(&base, &signed, &other_id, "UNSIGNED-PAYLOAD").map(|_| ()),
            Err(VerifyError::AccessKeyId)
        );
    }
}

#[test]
fn s3_and_other_services_encode_the_path_differently() {
    let ph = placeholder();
    let s3 = agent_signed(&ph, "/bucket/a%20key", "s3");
    let other = agent_signed(&ph, "/bucket/a%20key", "dynamodb");
    let sig = |agent: &AgentRequest| {
        parse_request(&agent.headers)
            .expect("valid")
            .authorization
            .signature
    };
    assert_ne!(sig(&s3), sig(&other));
    // S3 signs "/bucket/a%20key", the others "/bucket/a%2520key".
    let names = all_names(&s3.headers);
    for (agent, rule, uri) in [
        (&s3, UriPath::AsSent, "/bucket/a%20key"),
        (&other, UriPath::Normalize, "/bucket/a%2520key"),
    ] {
        let canonical =
            canonical_request(&agent.request(), &names, "UNSIGNED-PAYLOAD", rule).expect("present");
        assert!(String::from_utf8_lossy(&canonical).starts_with(&format!("PUT\n{uri}\n")));
    }
}

#[test]
fn resigned_requests_verify_with_the_real_credentials() {
    for (placeholder_token, real_token) in [
        (None, None),
        (None, Some("real-token/+=")),
        (Some("placeholder-token"), Some("real-token/+=")),
        (Some("placeholder-token"), None),
    ] {
        let ph = creds(
            "AKIAPLACEHOLDER00001",
            "placeholder/secret/known/to/the/broker/00",
            placeholder_token,
        );
        let real = creds(REAL_AKID, REAL_SECRET, real_token);
        for service in ["s3", "sqs"] {
            let agent = agent_signed(&ph, "/bucket/./x//y", service);
            let signed = parse_request(&agent.headers).expect("valid");
            verify(&agent.request(), &signed, &ph, "UNSIGNED-PAYLOAD")
                .expect("placeholder verifies");
            let resigned =
                sign(&agent.request(), &signed, &real, "UNSIGNED-PAYLOAD", None).expect("signs");
            let mut upstream = agent.headers.clone();
            resigned.apply(&mut upstream);

            assert_eq!(upstream.get(X_AMZ_DATE).expect("date"), SUITE_DATE);
            assert_eq!(
                upstream.get(X_AMZ_CONTENT_SHA256).expect("kept"),
                "UNSIGNED-PAYLOAD"
            );
            assert_eq!(
                upstream
                    .get(X_AMZ_SECURITY_TOKEN)
                    .map(|v| v.to_str().expect("text")),
                real_token
            );
            if let Some(token) = upstream.get(X_AMZ_SECURITY_TOKEN) {
                assert!(token.is_sensitive());
            }
            let resigned_parsed = parse_request(&upstream).expect("valid");
            let auth = &resigned_parsed.authorization;
            assert_eq!(auth.access_key_id, REAL_AKID);
            assert_eq!(auth.scope.service, service);
            assert_eq!(
                auth.signed_headers
                    .iter()
                    .any(|n| n == X_AMZ_SECURITY_TOKEN),
                real_token.is_some()
            );
            let upstream_request = Request {
                headers: &upstream,
                ..agent.request()
            };
            verify(
                &upstream_request,
                &resigned_parsed,
                &real,
                "UNSIGNED-PAYLOAD",
            )
            .expect("real verifies");
            assert_eq!(
                verify(&upstream_request, &resigned_parsed, &ph, "UNSIGNED-PAYLOAD").map(|_| ()),
                Err(VerifyError::AccessKeyId)
            );
            assert_eq!(resigned.chunks.previous_signature(), auth.signature);
        }
    }
}

/// Re-signing get-vanilla with the suite's credentials plus a session token gives exactly
/// get-vanilla-with-session-token's signature, and without one gives get-vanilla's.
#[test]
fn resigning_reproduces_the_suites_session_token_vector() {
    let ph = creds(
        "AKIAPLACEHOLDER00001",
        "placeholder-secret",
        Some("placeholder-token"),
    );
    let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
    let mut map = headers(&[
        HOST,
        ("x-amz-date", SUITE_DATE),
        ("x-amz-security-token", "placeholder-token"),
    ]);
    let names = all_names(&map);
    let canonical = canonical_request(
        &Request {
            method: "GET",
            path: "/",
            query: None,
            headers: &map,
        },
        &names,
        EMPTY_SHA256,
        UriPath::Normalize,
    )
    .expect("present");
    let auth = Authorization {
        access_key_id: ph.access_key_id.clone(),
        scope: suite_scope(),
        signed_headers: names,
        signature: signature(
            &ph.secret_access_key,
            &date(SUITE_DATE),
            &suite_scope(),
            &canonical,
        ),
    };
    map.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&auth.to_header_string()).expect("value"),
    );
    let request = Request {
        method: "GET",
        path: "/",
        query: None,
        headers: &map,
    };
    let signed = parse_request(&map).expect("valid");
    verify(&request, &signed, &ph, EMPTY_SHA256).expect("placeholder verifies");

    let with_token = sign(
        &request,
        &signed,
        &creds(SUITE_AKID, SUITE_SECRET, Some(token)),
        EMPTY_SHA256,
        None,
    )
    .expect("signs");
    assert_eq!(
        with_token.authorization,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
    );
    assert_eq!(with_token.security_token.as_ref().expect("set"), token);
    let without = sign(
        &request,
        &signed,
        &creds(SUITE_AKID, SUITE_SECRET, None),
        EMPTY_SHA256,
        None,
    )
    .expect("signs");
    assert_eq!(
        without.authorization,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    );
    assert_eq!(without.security_token, None);

    // A wrong placeholder token is refused, and so is a missing one.
    let wrong = creds(
        "AKIAPLACEHOLDER00001",
        "placeholder-secret",
        Some("other-token"),
    );
    assert_eq!(
        verify(&request, &signed, &wrong, EMPTY_SHA256).map(|_| ()),
        Err(VerifyError::SecurityToken)
    );
}

#[test]
fn resigning_with_a_new_date_moves_the_scope() {
    let ph = placeholder();
    let agent = agent_signed(&ph, "/q", "sqs");
    let signed = parse_request(&agent.headers).expect("valid");
    let real = creds(REAL_AKID, REAL_SECRET, None);
    let later = date("20150831T000001Z");
    let resigned = sign(
        &agent.request(),
        &signed,
        &real,
        "UNSIGNED-PAYLOAD",
        Some(later),
    )
    .expect("signs");
    let mut upstream = agent.headers.clone();
    resigned.apply(&mut upstream);
    assert_eq!(upstream.get(X_AMZ_DATE).expect("date"), "20150831T000001Z");
    let parsed = parse_request(&upstream).expect("scope follows the date");
    assert_eq!(parsed.authorization.scope.date, "20150831");
    verify(
        &Request {
            headers: &upstream,
            ..agent.request()
        },
        &parsed,
        &real,
        "UNSIGNED-PAYLOAD",
    )
    .expect("verifies");
}

#[test]
fn unusable_real_credentials_are_refused_without_echoing_them() {
    let ph = placeholder();
    let agent = agent_signed(&ph, "/q", "sqs");
    let signed = parse_request(&agent.headers).expect("valid");
    for akid in ["", "AKIA/X", "AKIA X", "AKIA,X"] {
        let e = sign(
            &agent.request(),
            &signed,
            &creds(akid, REAL_SECRET, None),
            "UNSIGNED-PAYLOAD",
            None,
        )
        .expect_err(akid);
        assert_eq!(e, SignError::AccessKeyId);
    }
    let bad_token = Credentials {
        session_token: Some(SecretValue::binary(b"zq9\x7fzq9".to_vec())),
        ..creds(REAL_AKID, REAL_SECRET, None)
    };
    let e = sign(
        &agent.request(),
        &signed,
        &bad_token,
        "UNSIGNED-PAYLOAD",
        None,
    )
    .expect_err("DEL");
    assert_eq!(e, SignError::SessionToken);
    assert!(!e.to_string().contains("zq9"));
}

#[test]
fn keys_never_show_in_debug() {
    let scope = suite_scope();
    let key = SigningKey::derive(&secret(SUITE_SECRET), &scope);
    assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
    let c = creds(SUITE_AKID, SUITE_SECRET, Some("session-token-value"));
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("EXAMPLEKEY") && !shown.contains("session-token-value"),
        "{shown}"
    );
}
