//! Rate limits and daily budgets, and the [`Limiter`] that keeps their counters.
//!
//! A rule's limits are counted per governing file: every cgroup a file governs shares one
//! counter per rule (the [`LimitKey`] is the file's cgroup and the rule), and a request is
//! counted at every level of the delegation chain whose matching rule has limits, so a parent's
//! limit binds the sum of its children.
//!
//! Pure apart from a `Mutex`: callers pass the time in. Daily budgets roll over at UTC
//! midnight; the limiter maps its monotonic `Instant`s to wall time through the pair of clocks
//! it was created with, so a wall-clock step does not refill a budget.

use std::{
    collections::HashMap,
    fmt,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use super::clock::{until_next_utc_midnight, utc_day};

/// `rate = { per_second = N }` or `{ per_minute = N }`, with an optional `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Requests per period.
    pub count: u32,
    pub period: RatePeriod,
    /// Requests that may come at once (the bucket size); defaults to `count`.
    pub burst: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RatePeriod {
    Second,
    Minute,
}

impl Rate {
    /// Sustained requests per second.
    pub fn per_second(&self) -> f64 {
        match self.period {
            RatePeriod::Second => f64::from(self.count),
            RatePeriod::Minute => f64::from(self.count) / 60.0,
        }
    }

    /// Whether this rate allows no more than `other` (sustained and burst).
    pub fn within(&self, other: &Rate) -> bool {
        // Compare per minute in integers, so 1/s and 60/min are equal.
        let per_minute = |r: &Rate| match r.period {
            RatePeriod::Second => u64::from(r.count) * 60,
            RatePeriod::Minute => u64::from(r.count),
        };
        per_minute(self) <= per_minute(other) && self.burst <= other.burst
    }
}

impl fmt::Display for Rate {
    /// As written in a policy: `{ per_second = 5, burst = 10 }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period {
            RatePeriod::Second => "per_second",
            RatePeriod::Minute => "per_minute",
        };
        write!(f, "{{ {unit} = {}, burst = {} }}", self.count, self.burst)
    }
}

/// `budget = { requests_per_day, bytes_per_day, tokens_per_day }`; each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Budget {
    pub requests_per_day: Option<u64>,
    /// Request plus response body bytes.
    pub bytes_per_day: Option<u64>,
    /// LLM tokens as the API reports them in `usage` (see [`super::UsageMeter`]).
    pub tokens_per_day: Option<u64>,
}

impl Budget {
    /// Whether no dimension exceeds `parent`'s (a dimension this budget leaves out is bound by
    /// the parent's at run time, so it does not widen).
    pub fn within(&self, parent: &Budget) -> Option<&'static str> {
        let over = |c: Option<u64>, p: Option<u64>| matches!((c, p), (Some(c), Some(p)) if c > p);
        if over(self.requests_per_day, parent.requests_per_day) {
            Some("requests_per_day")
        } else if over(self.bytes_per_day, parent.bytes_per_day) {
            Some("bytes_per_day")
        } else if over(self.tokens_per_day, parent.tokens_per_day) {
            Some("tokens_per_day")
        } else {
            None
        }
    }

    /// Whether any dimension is set.
    pub fn is_set(&self) -> bool {
        self.requests_per_day.is_some()
            || self.bytes_per_day.is_some()
            || self.tokens_per_day.is_some()
    }
}

impl fmt::Display for Budget {
    /// As written in a policy: `{ requests_per_day = 1000, tokens_per_day = 50000 }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            ("requests_per_day", self.requests_per_day),
            ("bytes_per_day", self.bytes_per_day),
            ("tokens_per_day", self.tokens_per_day),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k} = {v}")))
        .collect();
        write!(f, "{{ {} }}", parts.join(", "))
    }
}

/// What one limited rule at one level contributes to a request. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LimitKey(Arc<LimitSpec>);

#[derive(Debug)]
pub(super) struct LimitSpec {
    pub(super) id: LimitId,
    pub(super) rate: Option<Rate>,
    pub(super) budget: Option<Budget>,
    /// `api.example.test:443 (agents.toml:12 allow[0])`, for denial reasons.
    pub(super) label: String,
}

/// Counter identity: the governing file's cgroup and the rule's identity in it (its `name`,
/// or a description of what it matches), stable across reloads that keep the rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct LimitId {
    pub(super) cgroup: Arc<str>,
    pub(super) rule: Arc<str>,
}

impl LimitKey {
    pub(super) fn new(spec: LimitSpec) -> Self {
        Self(Arc::new(spec))
    }

    pub(super) fn id(&self) -> &LimitId {
        &self.0.id
    }

    /// The cgroup whose file holds the rule (its counters cover that whole subtree).
    pub fn cgroup(&self) -> &str {
        &self.0.id.cgroup
    }

    /// The rule's identity within its file.
    pub fn rule(&self) -> &str {
        &self.0.id.rule
    }

    pub fn rate(&self) -> Option<&Rate> {
        self.0.rate.as_ref()
    }

    pub fn budget(&self) -> Option<&Budget> {
        self.0.budget.as_ref()
    }

    /// Whether responses must be measured for this key (bytes or tokens budget).
    pub fn needs_usage(&self) -> bool {
        self.0
            .budget
            .is_some_and(|b| b.bytes_per_day.is_some() || b.tokens_per_day.is_some())
    }

    /// Whether the key counts LLM tokens (the response body's `usage` must be read).
    pub fn counts_tokens(&self) -> bool {
        self.0.budget.is_some_and(|b| b.tokens_per_day.is_some())
    }
}

impl PartialEq for LimitKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for LimitKey {}
impl Hash for LimitKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.hash(state);
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} for {}", self.0.label, self.0.id.cgroup)
    }
}

/// What a limit has left ([`Limiter::remaining`]); `None` where the limit sets no such bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitLeft {
    /// Requests the rate limit lets through at once now (its bucket, rounded down).
    pub rate_requests_now: Option<u64>,
    /// Requests left in today's budget (UTC day).
    pub requests_today: Option<u64>,
    /// Bytes left in today's budget.
    pub bytes_today: Option<u64>,
    /// LLM tokens left in today's budget.
    pub tokens_today: Option<u64>,
}

/// A request refused by a limit: answer 429 with `Retry-After`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct LimitDenial {
    /// When the request could succeed (round up to whole seconds for `Retry-After`).
    pub retry_after: Duration,
    /// Plain enough for an LLM agent: which limit, for whom, and when to retry.
    pub reason: String,
}

/// Counters of one key.
#[derive(Clone, Debug)]
struct Counter {
    /// Token bucket: requests available now, and when it was last refilled.
    tokens: f64,
    refilled: Instant,
    day: i64,
    requests: u64,
    bytes: u64,
    llm_tokens: u64,
}

/// Rate and budget counters for every limited rule. Share one per policy directory across
/// reloads ([`Limiter::retain_for`]).
#[derive(Debug)]
pub struct Limiter {
    /// The same moment on both clocks: maps `Instant`s to UTC days.
    epoch: (Instant, SystemTime),
    counters: Mutex<HashMap<LimitId, Counter>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    /// A limiter whose days follow the system clock from now on.
    pub fn new() -> Self {
        Self::with_epoch(Instant::now(), SystemTime::now())
    }

    /// A limiter for which `instant` is the wall-clock time `wall` (tests pass both).
    pub fn with_epoch(instant: Instant, wall: SystemTime) -> Self {
        Self {
            epoch: (instant, wall),
            counters: Mutex::new(HashMap::new()),
        }
    }

    fn wall(&self, now: Instant) -> SystemTime {
        match now.checked_duration_since(self.epoch.0) {
            Some(d) => self.epoch.1 + d,
            None => self.epoch.1 - self.epoch.0.duration_since(now),
        }
    }

    /// Counts one request against every key, or refuses it without counting anything. On a
    /// refusal, `retry_after` is the longest wait among the limits that refused.
    pub fn check(&self, keys: &[LimitKey], now: Instant) -> Result<(), LimitDenial> {
        if keys.is_empty() {
            return Ok(());
        }
        let wall = self.wall(now);
        let day = utc_day(wall);
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut worst: Option<(Duration, String)> = None;
        for key in keys {
            let spec = &key.0;
            let c = counters
                .entry(spec.id.clone())
                .or_insert_with(|| fresh(spec, now, day));
            refresh(c, spec, now, day);
            if let Some(denial) = refusal(c, spec, wall)
                && worst.as_ref().is_none_or(|(d, _)| denial.0 > *d)
            {
                worst = Some(denial);
            }
        }
        if let Some((retry_after, reason)) = worst {
            return Err(LimitDenial {
                retry_after,
                reason,
            });
        }
        for key in keys {
            if let Some(c) = counters.get_mut(&key.0.id) {
                if key.0.rate.is_some() {
                    c.tokens -= 1.0;
                }
                c.requests += 1;
            }
        }
        Ok(())
    }

    /// Adds a finished exchange's bytes (request plus response bodies) and LLM tokens to every
    /// key's daily budget. Later requests are refused once a budget is used up.
    pub fn record(&self, keys: &[LimitKey], bytes: u64, tokens: u64, now: Instant) {
        if keys.is_empty() {
            return;
        }
        let day = utc_day(self.wall(now));
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            let spec = &key.0;
            let c = counters
                .entry(spec.id.clone())
                .or_insert_with(|| fresh(spec, now, day));
            refresh(c, spec, now, day);
            c.bytes = c.bytes.saturating_add(bytes);
            c.llm_tokens = c.llm_tokens.saturating_add(tokens);
        }
    }

    /// Adds bytes passing through a long-lived stream (an upgraded connection) to every key's
    /// daily budget now, and refuses once a bytes budget is exceeded by them, so the caller can
    /// cut the stream. The bytes are counted either way.
    pub fn charge_bytes(
        &self,
        keys: &[LimitKey],
        bytes: u64,
        now: Instant,
    ) -> Result<(), LimitDenial> {
        if keys.is_empty() {
            return Ok(());
        }
        let wall = self.wall(now);
        let day = utc_day(wall);
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut over = None;
        for key in keys {
            let spec = &key.0;
            let c = counters
                .entry(spec.id.clone())
                .or_insert_with(|| fresh(spec, now, day));
            refresh(c, spec, now, day);
            c.bytes = c.bytes.saturating_add(bytes);
            if let Some(limit) = spec.budget.and_then(|b| b.bytes_per_day)
                && c.bytes > limit
                && over.is_none()
            {
                let wait = until_next_utc_midnight(wall);
                over = Some(LimitDenial {
                    retry_after: wait,
                    reason: format!(
                        "daily budget used up: {} may use {limit} bytes per day with {}; it \
                         resets at 00:00 UTC, retry after {}",
                        spec.id.cgroup,
                        spec.label,
                        show_wait(wait)
                    ),
                });
            }
        }
        over.map_or(Ok(()), Err)
    }

    /// What `key` has left now, without counting anything: the requests its rate bucket
    /// would take at once, and what remains of each daily budget. A key with no counter yet
    /// (never used) has everything left.
    pub fn remaining(&self, key: &LimitKey, now: Instant) -> LimitLeft {
        let spec = &key.0;
        let day = utc_day(self.wall(now));
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut c = counters
            .get(&spec.id)
            .cloned()
            .unwrap_or_else(|| fresh(spec, now, day));
        drop(counters);
        refresh(&mut c, spec, now, day);
        let left = |limit: Option<u64>, used: u64| limit.map(|l| l.saturating_sub(used));
        let budget = spec.budget.unwrap_or_default();
        LimitLeft {
            rate_requests_now: spec.rate.map(|_| c.tokens.max(0.0).floor() as u64),
            requests_today: left(budget.requests_per_day, c.requests),
            bytes_today: left(budget.bytes_per_day, c.bytes),
            tokens_today: left(budget.tokens_per_day, c.llm_tokens),
        }
    }

    /// Drops the counters of rules `policy` no longer has; the others carry on (with the new
    /// limits, if they changed).
    pub fn retain_for(&self, policy: &super::Policy) {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        counters.retain(|id, _| policy.limit_ids.contains(id));
    }

    /// How many keys have counters (for status output and tests).
    pub fn len(&self) -> usize {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no key has counters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn fresh(spec: &LimitSpec, now: Instant, day: i64) -> Counter {
    Counter {
        tokens: spec.rate.map_or(0.0, |r| f64::from(r.burst)),
        refilled: now,
        day,
        requests: 0,
        bytes: 0,
        llm_tokens: 0,
    }
}

/// Refills the bucket for the time passed and starts a new day's budget.
fn refresh(c: &mut Counter, spec: &LimitSpec, now: Instant, day: i64) {
    if let Some(rate) = spec.rate {
        let elapsed = now.saturating_duration_since(c.refilled).as_secs_f64();
        c.tokens = (c.tokens + elapsed * rate.per_second()).min(f64::from(rate.burst));
        if now > c.refilled {
            c.refilled = now;
        }
    }
    if day > c.day {
        c.day = day;
        c.requests = 0;
        c.bytes = 0;
        c.llm_tokens = 0;
    }
}

/// Why `c` cannot take one more request now, and how long until it can.
fn refusal(c: &Counter, spec: &LimitSpec, wall: SystemTime) -> Option<(Duration, String)> {
    let who = &spec.id.cgroup;
    let what = &spec.label;
    if let Some(rate) = spec.rate
        && c.tokens < 1.0
    {
        let wait = Duration::from_secs_f64(((1.0 - c.tokens) / rate.per_second()).max(0.001));
        let per = match rate.period {
            RatePeriod::Second => "second",
            RatePeriod::Minute => "minute",
        };
        return Some((
            wait,
            format!(
                "rate limit reached: {who} may send {} requests per {per} (bursts of {}) to \
                     {what}; retry after {}",
                rate.count,
                rate.burst,
                show_wait(wait)
            ),
        ));
    }
    let budget = spec.budget?;
    let used_up = [
        (budget.requests_per_day, c.requests, "requests"),
        (budget.bytes_per_day, c.bytes, "bytes"),
        (budget.tokens_per_day, c.llm_tokens, "LLM tokens"),
    ]
    .into_iter()
    .find_map(|(limit, used, unit)| limit.filter(|l| used >= *l).map(|l| (l, unit)));
    used_up.map(|(limit, unit)| {
        let wait = until_next_utc_midnight(wall);
        (
            wait,
            format!(
                "daily budget used up: {who} may use {limit} {unit} per day with {what}; it \
                 resets at 00:00 UTC, retry after {}",
                show_wait(wait)
            ),
        )
    })
}

/// `0.2s`, `3s`, `2h05m`.
fn show_wait(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{:.1}s", d.as_secs_f64().max(0.1))
    } else if secs < 60 {
        format!("{}s", d.as_secs_f64().ceil())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn key(cgroup: &str, rule: &str, rate: Option<Rate>, budget: Option<Budget>) -> LimitKey {
        LimitKey::new(LimitSpec {
            id: LimitId {
                cgroup: cgroup.into(),
                rule: rule.into(),
            },
            rate,
            budget,
            label: format!("{rule}:443 (p.toml allow[0])"),
        })
    }

    fn per_second(count: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            count,
            period: RatePeriod::Second,
            burst,
        })
    }

    /// A limiter whose epoch is 10:00 UTC on day 20000.
    fn limiter() -> (Limiter, Instant) {
        let start = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 10 * 3600);
        (Limiter::with_epoch(start, wall), start)
    }

    #[test]
    fn remaining_reads_what_is_left_without_counting() {
        let (l, t0) = limiter();
        let budget = Budget {
            requests_per_day: Some(5),
            bytes_per_day: Some(1000),
            tokens_per_day: None,
        };
        let k = [key("agents", "api", per_second(2, 3), Some(budget))];
        let fresh = l.remaining(&k[0], t0);
        assert_eq!(
            fresh,
            LimitLeft {
                rate_requests_now: Some(3),
                requests_today: Some(5),
                bytes_today: Some(1000),
                tokens_today: None,
            }
        );
        assert!(l.is_empty(), "reading made no counter");
        l.check(&k, t0).expect("within");
        l.check(&k, t0).expect("within");
        l.record(&k, 400, 0, t0);
        let left = l.remaining(&k[0], t0);
        assert_eq!(left.rate_requests_now, Some(1));
        assert_eq!(left.requests_today, Some(3));
        assert_eq!(left.bytes_today, Some(600));
        assert_eq!(l.remaining(&k[0], t0), left, "reading counts nothing");
        // The bucket refills with time; the day's budget does not until midnight.
        let later = l.remaining(&k[0], t0 + Duration::from_secs(1));
        assert_eq!(later.rate_requests_now, Some(3));
        assert_eq!(later.requests_today, Some(3));
        let tomorrow = l.remaining(&k[0], t0 + Duration::from_secs(15 * 3600));
        assert_eq!(tomorrow.requests_today, Some(5));
        // A key with no rate has no bucket to show.
        let k2 = key("agents", "other", None, Some(budget));
        assert_eq!(l.remaining(&k2, t0).rate_requests_now, None);
    }

    #[test]
    fn token_bucket_allows_bursts_and_refills() {
        let (l, t0) = limiter();
        let k = [key("agents", "api", per_second(2, 3), None)];
        for _ in 0..3 {
            l.check(&k, t0).expect("burst");
        }
        let d = l.check(&k, t0).expect_err("bucket empty");
        assert_eq!(d.retry_after, Duration::from_millis(500));
        assert!(
            d.reason.starts_with(
                "rate limit reached: agents may send 2 requests per second (bursts of 3) to \
                 api:443 (p.toml allow[0]); retry after 0.5s"
            ),
            "{}",
            d.reason
        );
        // Half a second refills one request.
        l.check(&k, t0 + Duration::from_millis(500))
            .expect("refilled");
        assert!(l.check(&k, t0 + Duration::from_millis(500)).is_err());
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            l.check(&k, later).expect("burst again");
        }
        assert!(l.check(&k, later).is_err());
    }

    #[test]
    fn per_minute_rates() {
        let (l, t0) = limiter();
        let rate = Rate {
            count: 6,
            period: RatePeriod::Minute,
            burst: 1,
        };
        let k = [key("a", "r", Some(rate), None)];
        l.check(&k, t0).expect("first");
        let d = l.check(&k, t0).expect_err("second");
        assert_eq!(d.retry_after, Duration::from_secs(10));
        assert!(d.reason.contains("6 requests per minute"), "{}", d.reason);
        l.check(&k, t0 + Duration::from_secs(10))
            .expect("after 10s");
    }

    #[test]
    fn all_or_nothing_across_levels() {
        let (l, t0) = limiter();
        let child = key("agents/a", "r", per_second(1, 5), None);
        let parent = key("agents", "r", per_second(1, 2), None);
        let keys = [child.clone(), parent.clone()];
        l.check(&keys, t0).expect("1");
        l.check(&keys, t0).expect("2");
        let d = l.check(&keys, t0).expect_err("parent bucket empty");
        assert!(
            d.reason.contains("agents may send 1 requests"),
            "{}",
            d.reason
        );
        // The refused request took nothing from the child's bucket: 3 left there.
        for _ in 0..3 {
            l.check(std::slice::from_ref(&child), t0)
                .expect("child alone");
        }
        assert!(l.check(std::slice::from_ref(&child), t0).is_err());

        // A sibling governed by the same parent shares the parent's counter.
        let sibling = key("agents/b", "r", per_second(1, 5), None);
        assert!(l.check(&[sibling, parent], t0).is_err());
    }

    #[test]
    fn request_budget_resets_at_utc_midnight() {
        let (l, t0) = limiter();
        let budget = Budget {
            requests_per_day: Some(2),
            ..Budget::default()
        };
        let k = [key("a", "r", None, Some(budget))];
        l.check(&k, t0).expect("1");
        l.check(&k, t0).expect("2");
        let d = l.check(&k, t0).expect_err("used up");
        // 10:00 UTC: 14 hours to midnight.
        assert_eq!(d.retry_after, Duration::from_secs(14 * 3600));
        assert!(
            d.reason.starts_with(
                "daily budget used up: a may use 2 requests per day with r:443 (p.toml \
                 allow[0]); it resets at 00:00 UTC, retry after 14h00m"
            ),
            "{}",
            d.reason
        );
        l.check(&k, t0 + Duration::from_secs(14 * 3600))
            .expect("next day");
    }

    #[test]
    fn bytes_and_tokens_budgets_deny_after_recording() {
        let (l, t0) = limiter();
        let budget = Budget {
            bytes_per_day: Some(1000),
            tokens_per_day: Some(100),
            ..Budget::default()
        };
        let k = [key("a", "r", None, Some(budget))];
        assert!(k[0].needs_usage() && k[0].counts_tokens());
        l.check(&k, t0).expect("first");
        l.record(&k, 400, 60, t0);
        l.check(&k, t0).expect("under both");
        l.record(&k, 100, 40, t0);
        let d = l.check(&k, t0).expect_err("tokens used up");
        assert!(d.reason.contains("100 LLM tokens per day"), "{}", d.reason);
        l.record(&k, 10_000, 0, t0);
        let d = l.check(&k, t0).expect_err("bytes used up");
        assert!(d.reason.contains("1000 bytes per day"), "{}", d.reason);
        l.check(&k, t0 + Duration::from_secs(14 * 3600))
            .expect("next day");
    }

    #[test]
    fn bytes_charged_as_they_pass_refuse_once_over_the_budget() {
        let (l, t0) = limiter();
        let budget = Budget {
            bytes_per_day: Some(1000),
            ..Budget::default()
        };
        let k = [key("a", "r", None, Some(budget))];
        l.check(&k, t0).expect("the upgrade");
        l.charge_bytes(&k, 600, t0).expect("under");
        l.charge_bytes(&k, 400, t0).expect("exactly the budget");
        let d = l.charge_bytes(&k, 1, t0).expect_err("over");
        assert!(d.reason.contains("1000 bytes per day"), "{}", d.reason);
        assert_eq!(d.retry_after, Duration::from_secs(14 * 3600));
        // Counted: the next request is refused too.
        assert!(l.check(&k, t0).is_err());
        // A key without a bytes budget never refuses.
        let free = [key("a", "free", None, None)];
        l.charge_bytes(&free, u64::MAX, t0).expect("no budget");
        l.charge_bytes(&[], 5, t0).expect("no keys");
    }

    #[test]
    fn no_keys_no_counters() {
        let (l, t0) = limiter();
        l.check(&[], t0).expect("nothing to count");
        l.record(&[], 5, 5, t0);
        assert!(l.is_empty());
    }

    #[test]
    fn rate_and_budget_comparisons() {
        let r = |count, period, burst| Rate {
            count,
            period,
            burst,
        };
        assert!(r(1, RatePeriod::Second, 1).within(&r(60, RatePeriod::Minute, 1)));
        assert!(!r(2, RatePeriod::Second, 1).within(&r(60, RatePeriod::Minute, 1)));
        assert!(!r(1, RatePeriod::Second, 5).within(&r(1, RatePeriod::Second, 4)));
        assert_eq!(
            r(5, RatePeriod::Second, 10).to_string(),
            "{ per_second = 5, burst = 10 }"
        );
        let b = |r, by, t| Budget {
            requests_per_day: r,
            bytes_per_day: by,
            tokens_per_day: t,
        };
        assert_eq!(
            b(Some(5), None, None).within(&b(Some(10), Some(1), None)),
            None
        );
        assert_eq!(
            b(Some(50), None, None).within(&b(Some(10), None, None)),
            Some("requests_per_day")
        );
        assert_eq!(
            b(None, None, Some(2)).within(&b(None, None, Some(1))),
            Some("tokens_per_day")
        );
        assert_eq!(
            b(Some(1), None, Some(2)).to_string(),
            "{ requests_per_day = 1, tokens_per_day = 2 }"
        );
    }

    #[test]
    fn waits_read_well() {
        assert_eq!(show_wait(Duration::from_millis(200)), "0.2s");
        assert_eq!(show_wait(Duration::from_millis(1200)), "2s");
        assert_eq!(show_wait(Duration::from_secs(75)), "1m15s");
        assert_eq!(show_wait(Duration::from_secs(7500)), "2h05m");
    }
}
