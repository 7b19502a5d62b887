//! What the soak samples: brokerd's runtime gauges, read from its metrics (`brokerctl metrics`,
//! through the control socket), and the load's running counts. One [`Sample`] is one CSV row.

use std::{fmt::Write as _, fs, path::Path};

use super::drift::Allowance;

/// One gauge the soak watches: its CSV column, the metric it comes from, the factor from the
/// metric's unit to the column's, and the rise the drift rule allows (see [`super::drift`]).
pub struct Gauge {
    pub column: &'static str,
    pub metric: &'static str,
    pub scale: f64,
    pub allowance: Allowance,
    /// What the column means, for the plot's legend and the README.
    pub what: &'static str,
}

/// The gauges, in CSV order. The allowances are noise floors for a debug build on a busy
/// two-core machine: a healthy brokerd stays within them, a gauge that rises for the whole run
/// (a pool that never shrinks, a table never pruned, a task per connection never ended) does
/// not. The answered-names table is pruned once a minute, so it saws up and down by about as
/// many agents as start in a minute (its floor of 16).
pub const GAUGES: &[Gauge] = &[
    Gauge {
        column: "rss_mib",
        metric: "agent_broker_runtime_rss_bytes",
        scale: 1.0 / (1024.0 * 1024.0),
        allowance: Allowance {
            absolute: 24.0,
            relative: 0.10,
        },
        what: "resident memory (MiB)",
    },
    Gauge {
        column: "open_fds",
        metric: "agent_broker_runtime_open_fds",
        scale: 1.0,
        allowance: Allowance {
            absolute: 24.0,
            relative: 0.10,
        },
        what: "open file descriptors",
    },
    Gauge {
        column: "tasks",
        metric: "agent_broker_runtime_tasks",
        scale: 1.0,
        allowance: Allowance {
            absolute: 24.0,
            relative: 0.10,
        },
        what: "tasks alive",
    },
    Gauge {
        column: "upstream_pool",
        metric: "agent_broker_upstream_pool_connections",
        scale: 1.0,
        allowance: Allowance {
            absolute: 8.0,
            relative: 0.10,
        },
        what: "pooled upstream connections",
    },
    Gauge {
        column: "leaf_cache",
        metric: "agent_broker_runtime_leaf_cache_entries",
        scale: 1.0,
        allowance: Allowance {
            absolute: 4.0,
            relative: 0.10,
        },
        what: "leaf certificates cached",
    },
    Gauge {
        column: "answered_names",
        metric: "agent_broker_runtime_answered_names",
        scale: 1.0,
        allowance: Allowance {
            absolute: 16.0,
            relative: 0.10,
        },
        what: "answered-names entries",
    },
    Gauge {
        column: "audit_queue",
        metric: "agent_broker_audit_queue_depth",
        scale: 1.0,
        allowance: Allowance {
            absolute: 64.0,
            relative: 0.50,
        },
        what: "audit records queued",
    },
    Gauge {
        column: "connections_open",
        metric: "agent_broker_connections_open",
        scale: 1.0,
        allowance: Allowance {
            absolute: 16.0,
            relative: 0.15,
        },
        what: "agent connections open",
    },
];

/// One row: seconds since the load started, each gauge of [`GAUGES`], and the operations the
/// load has finished so far and how many of them failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub seconds: f64,
    pub gauges: Vec<f64>,
    pub operations: u64,
    pub failures: u64,
}

/// Why metrics or a CSV could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("brokerd's metrics have no {0} (is this brokerd older than the soak?)")]
    MissingMetric(&'static str),
    #[error("{path}: line {line}: {message}")]
    Csv {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The value of `metric` in an OpenMetrics text, summed over its label sets (a gauge the proxy
/// threads each report has one series per thread in some versions).
pub fn metric_value(text: &str, metric: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        // The name must end here: `..._entries` is not `..._entries_total`.
        let value = match rest.chars().next() {
            Some(' ') => rest.trim(),
            Some('{') => rest.rsplit_once('}').map_or("", |(_, v)| v.trim()),
            _ => continue,
        };
        // A value may be followed by a timestamp.
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The gauges of [`GAUGES`] from a metrics text, scaled to their columns' units.
pub fn gauges_from(text: &str) -> Result<Vec<f64>, SampleError> {
    GAUGES
        .iter()
        .map(|g| {
            metric_value(text, g.metric)
                .map(|v| v * g.scale)
                .ok_or(SampleError::MissingMetric(g.metric))
        })
        .collect()
}

/// The CSV's header line.
pub fn csv_header() -> String {
    let mut header = "seconds".to_owned();
    for g in GAUGES {
        header.push(',');
        header.push_str(g.column);
    }
    header.push_str(",operations,failures");
    header
}

/// One CSV line (without its newline).
pub fn csv_line(sample: &Sample) -> String {
    let mut line = format!("{:.1}", sample.seconds);
    for v in &sample.gauges {
        let _ = write!(line, ",{}", trim_float(*v));
    }
    let _ = write!(line, ",{},{}", sample.operations, sample.failures);
    line
}

/// Whole numbers without decimals, others with two.
fn trim_float(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Reads a CSV the soak wrote; its header must be [`csv_header`]'s.
pub fn read_csv(path: &Path) -> Result<Vec<Sample>, SampleError> {
    let shown = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|source| SampleError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_csv(&text, &shown)
}

/// Parses a CSV text (see [`read_csv`]); `name` is for error messages.
pub fn parse_csv(text: &str, name: &str) -> Result<Vec<Sample>, SampleError> {
    let error = |line: usize, message: String| SampleError::Csv {
        path: name.to_owned(),
        line,
        message,
    };
    let mut lines = text.lines().enumerate();
    let expected = csv_header();
    match lines.next() {
        Some((_, header)) if header.trim() == expected => {}
        Some((_, header)) => {
            return Err(error(
                1,
                format!("the header is `{header}`, expected `{expected}`"),
            ));
        }
        None => return Err(error(1, "the file is empty".into())),
    }
    let columns = GAUGES.len() + 3;
    let mut samples = Vec::new();
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != columns {
            return Err(error(
                index + 1,
                format!("{} fields, expected {columns}", fields.len()),
            ));
        }
        let number = |i: usize| {
            fields[i]
                .trim()
                .parse::<f64>()
                .map_err(|_| error(index + 1, format!("`{}` is not a number", fields[i])))
        };
        let gauges = (1..=GAUGES.len())
            .map(number)
            .collect::<Result<Vec<_>, _>>()?;
        samples.push(Sample {
            seconds: number(0)?,
            gauges,
            operations: number(columns - 2)? as u64,
            failures: number(columns - 1)? as u64,
        });
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# TYPE agent_broker_runtime_leaf_cache_entries gauge
agent_broker_runtime_leaf_cache_entries 12
agent_broker_runtime_leaf_cache_entries_total 99
# TYPE agent_broker_upstream_pool_connections gauge
agent_broker_upstream_pool_connections{thread=\"0\"} 3
agent_broker_upstream_pool_connections{thread=\"1\"} 4 1700000000
agent_broker_runtime_rss_bytes 104857600
";

    #[test]
    fn reads_gauges_by_exact_name_summed_over_labels() {
        assert_eq!(
            metric_value(METRICS, "agent_broker_runtime_leaf_cache_entries"),
            Some(12.0)
        );
        assert_eq!(
            metric_value(METRICS, "agent_broker_upstream_pool_connections"),
            Some(7.0)
        );
        assert_eq!(metric_value(METRICS, "agent_broker_runtime_tasks"), None);
    }

    #[test]
    fn a_missing_gauge_is_named() {
        let err = gauges_from(METRICS).expect_err("an error");
        assert!(
            err.to_string().contains("agent_broker_runtime_open_fds"),
            "{err}"
        );
    }

    #[test]
    fn csv_round_trips() {
        let sample = Sample {
            seconds: 12.5,
            gauges: (0..GAUGES.len()).map(|i| i as f64 + 0.25).collect(),
            operations: 40,
            failures: 1,
        };
        let text = format!("{}\n{}\n", csv_header(), csv_line(&sample));
        assert_eq!(parse_csv(&text, "t.csv").expect("parsed"), vec![sample]);
    }

    #[test]
    fn a_bad_csv_says_where() {
        let err = parse_csv("seconds,x\n1,2\n", "t.csv").expect_err("an error");
        assert!(err.to_string().starts_with("t.csv: line 1:"), "{err}");
        let text = format!("{}\n1,2\n", csv_header());
        let err = parse_csv(&text, "t.csv").expect_err("an error");
        assert!(err.to_string().contains("line 2: 2 fields"), "{err}");
    }
}
