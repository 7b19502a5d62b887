//! The soak's verdict: does a gauge drift upward after warm-up? A level is never judged, only a
//! steady rise, so a debug build's larger heap or a busy machine's longer queues do not fail it,
//! and a pool that never shrinks does.
//!
//! The samples after warm-up are split into thirds by count. The series drifts when both
//!
//! - the median of the last third exceeds the median of the second third by more than the
//!   metric's allowance, and
//! - the least-squares slope over all samples after warm-up, times the length of one third,
//!   also exceeds it.
//!
//! Medians ignore single spikes (a burst of connections at the moment of a sample); the slope
//! ignores a single step that happens to fall between the thirds only when it is small, and
//! requiring both keeps one late step (an allocator arena added once) from failing a run while a
//! steady rise, which moves both, still does. The first third is left out of the comparison: it
//! is where the last of the warm-up's growth settles.
//!
//! The allowance is the larger of an absolute noise floor (so a small gauge moving between 0 and
//! 2 is not a drift) and a fraction of the second third's median.

use std::fmt;

/// How much a metric may rise, by the rule above.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Allowance {
    /// Rise always allowed, in the metric's unit.
    pub absolute: f64,
    /// Rise allowed as a fraction of the second third's median.
    pub relative: f64,
}

impl Allowance {
    /// The allowed rise above `level`.
    pub fn at(self, level: f64) -> f64 {
        self.absolute.max(self.relative * level.abs())
    }
}

/// What the rule found for one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Samples after warm-up that were judged.
    pub samples: usize,
    pub second_third_median: f64,
    pub last_third_median: f64,
    /// Least-squares slope after warm-up, in the metric's unit per hour.
    pub slope_per_hour: f64,
    /// The slope's rise over the length of one third.
    pub slope_rise_per_third: f64,
    /// The rise allowed.
    pub allowed: f64,
    pub drifting: bool,
}

impl Verdict {
    /// The rise of the medians.
    pub fn median_rise(&self) -> f64 {
        self.last_third_median - self.second_third_median
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "median {:.1} -> {:.1} (rise {:.1}), slope {:.1}/h ({:.1} per third), allowed {:.1}: {}",
            self.second_third_median,
            self.last_third_median,
            self.median_rise(),
            self.slope_per_hour,
            self.slope_rise_per_third,
            self.allowed,
            if self.drifting { "DRIFT" } else { "steady" }
        )
    }
}

/// Why a series could not be judged.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DriftError {
    #[error(
        "only {got} samples after the {warm_up_seconds:.0} s warm-up; the rule needs at least \
         {MIN_SAMPLES} (run longer, or sample more often)"
    )]
    TooFewSamples { got: usize, warm_up_seconds: f64 },
    #[error("the times and values differ in length ({times} and {values})")]
    Mismatch { times: usize, values: usize },
}

/// The fewest samples after warm-up the rule judges: three per third.
pub const MIN_SAMPLES: usize = 9;

/// Judges `values` sampled at `times` (seconds from the start, rising) after `warm_up_seconds`.
pub fn judge(
    times: &[f64],
    values: &[f64],
    warm_up_seconds: f64,
    allowance: Allowance,
) -> Result<Verdict, DriftError> {
    if times.len() != values.len() {
        return Err(DriftError::Mismatch {
            times: times.len(),
            values: values.len(),
        });
    }
    let (times, values): (Vec<f64>, Vec<f64>) = times
        .iter()
        .zip(values)
        .filter(|(t, _)| **t >= warm_up_seconds)
        .map(|(t, v)| (*t, *v))
        .unzip();
    let n = times.len();
    if n < MIN_SAMPLES {
        return Err(DriftError::TooFewSamples {
            got: n,
            warm_up_seconds,
        });
    }
    let third = n / 3;
    let second = median(&values[third..2 * third]);
    let last = median(&values[n - third..]);
    let slope = least_squares_slope(&times, &values);
    let span = times[n - 1] - times[0];
    let slope_rise_per_third = slope * span / 3.0;
    let allowed = allowance.at(second);
    let drifting = last - second > allowed && slope_rise_per_third > allowed;
    Ok(Verdict {
        samples: n,
        second_third_median: second,
        last_third_median: last,
        slope_per_hour: slope * 3600.0,
        slope_rise_per_third,
        allowed,
        drifting,
    })
}

/// The median of a non-empty slice.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The slope of the least-squares line through the points (zero when all times are equal).
fn least_squares_slope(times: &[f64], values: &[f64]) -> f64 {
    let n = times.len() as f64;
    let mean_t = times.iter().sum::<f64>() / n;
    let mean_v = values.iter().sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (t, v) in times.iter().zip(values) {
        covariance += (t - mean_t) * (v - mean_v);
        variance += (t - mean_t) * (t - mean_t);
    }
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic noise source (a linear congruential generator) in [-1, 1].
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    /// Samples every 2 s for 5 minutes, as the CI soak takes them.
    fn times() -> Vec<f64> {
        (0..150).map(|i| f64::from(i) * 2.0).collect()
    }

    const RSS: Allowance = Allowance {
        absolute: 24.0,
        relative: 0.1,
    };
    const WARM_UP: f64 = 150.0;

    #[test]
    fn a_flat_noisy_series_passes() {
        let mut noise = Noise(7);
        let times = times();
        // 180 MiB give or take 10, with spikes of +60 MiB every 20th sample.
        let values: Vec<f64> = (0..times.len())
            .map(|i| 180.0 + 10.0 * noise.next() + if i % 20 == 0 { 60.0 } else { 0.0 })
            .collect();
        let verdict = judge(&times, &values, WARM_UP, RSS).expect("judged");
        assert!(!verdict.drifting, "{verdict}");
        assert_eq!(verdict.samples, 75);
    }

    #[test]
    fn a_steady_leak_fails() {
        let mut noise = Noise(11);
        let times = times();
        // 1 MiB a second (60 MiB a minute) on top of the same noise.
        let values: Vec<f64> = times
            .iter()
            .map(|t| 180.0 + t * 1.0 + 10.0 * noise.next())
            .collect();
        let verdict = judge(&times, &values, WARM_UP, RSS).expect("judged");
        assert!(verdict.drifting, "{verdict}");
        assert!(verdict.slope_per_hour > 3000.0, "{verdict}");
    }

    #[test]
    fn a_slow_pool_leak_fails_where_the_pool_is_small() {
        // A pool that never shrinks: a connection more every 3 s, from 40.
        let times = times();
        let pool = Allowance {
            absolute: 8.0,
            relative: 0.1,
        };
        let values: Vec<f64> = times.iter().map(|t| 40.0 + (t / 3.0).floor()).collect();
        assert!(
            judge(&times, &values, WARM_UP, pool)
                .expect("judged")
                .drifting
        );
        // The same pool, steady around 80 with churn of +-10.
        let mut noise = Noise(3);
        let steady: Vec<f64> = times
            .iter()
            .map(|_| (80.0 + 10.0 * noise.next()).round())
            .collect();
        assert!(
            !judge(&times, &steady, WARM_UP, pool)
                .expect("judged")
                .drifting
        );
    }

    #[test]
    fn a_step_during_warm_up_passes() {
        let mut noise = Noise(5);
        let times = times();
        // Debug-build RSS: 92 MiB, then steps to 180 MiB in the first two minutes, then flat.
        let values: Vec<f64> = times
            .iter()
            .map(|t| {
                let level = if *t < 40.0 {
                    92.0
                } else if *t < 120.0 {
                    140.0
                } else {
                    180.0
                };
                level + 4.0 * noise.next()
            })
            .collect();
        let verdict = judge(&times, &values, WARM_UP, RSS).expect("judged");
        assert!(!verdict.drifting, "{verdict}");
        // The same step between the second and last thirds is a rise the rule sees.
        let late: Vec<f64> = times
            .iter()
            .map(|t| if *t < 250.0 { 92.0 } else { 180.0 })
            .collect();
        assert!(judge(&times, &late, WARM_UP, RSS).expect("judged").drifting);
    }

    #[test]
    fn one_late_step_within_the_allowance_passes() {
        let times = times();
        // One allocator arena (16 MiB) added near the end: medians move, but by less than the
        // allowance of 24 MiB.
        let values: Vec<f64> = times
            .iter()
            .map(|t| if *t < 280.0 { 180.0 } else { 196.0 })
            .collect();
        assert!(
            !judge(&times, &values, WARM_UP, RSS)
                .expect("judged")
                .drifting
        );
    }

    #[test]
    fn a_falling_series_passes() {
        let times = times();
        let values: Vec<f64> = times.iter().map(|t| 500.0 - t).collect();
        assert!(
            !judge(&times, &values, WARM_UP, RSS)
                .expect("judged")
                .drifting
        );
    }

    #[test]
    fn too_few_samples_are_an_error_that_says_so() {
        let times = [0.0, 100.0, 200.0, 210.0];
        let err = judge(&times, &[1.0; 4], WARM_UP, RSS).expect_err("an error");
        assert_eq!(
            err,
            DriftError::TooFewSamples {
                got: 2,
                warm_up_seconds: WARM_UP
            }
        );
        assert!(err.to_string().contains("at least 9"), "{err}");
        assert!(matches!(
            judge(&[1.0], &[], 0.0, RSS),
            Err(DriftError::Mismatch { .. })
        ));
    }

    #[test]
    fn medians_and_slopes() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let slope = least_squares_slope(&[0.0, 1.0, 2.0], &[1.0, 3.0, 5.0]);
        assert!((slope - 2.0).abs() < 1e-9);
        assert_eq!(least_squares_slope(&[1.0, 1.0], &[0.0, 5.0]), 0.0);
    }
}
