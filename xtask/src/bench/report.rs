//! The bench's results: one row per workload, one cell per column (direct, brokerd, nginx,
//! mitmproxy), brokerd's ratios to the others, and the targets of issues 7 and 12 with whether
//! each is met.
//! Rendered as a Markdown table (for the terminal and README.md) and as JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

/// The paths a request can take to the origin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    /// The client outside the agent cgroup, holding the real key: the floor.
    Direct,
    /// The client inside the tagged agent cgroup, holding a placeholder; brokerd injects the key.
    Brokerd,
    /// nginx as a TLS-terminating reverse proxy that sets the header.
    Nginx,
    /// mitmproxy in reverse mode with a header-setting addon.
    Mitmproxy,
}

impl Column {
    pub const ALL: [Self; 4] = [Self::Direct, Self::Brokerd, Self::Nginx, Self::Mitmproxy];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Brokerd => "brokerd",
            Self::Nginx => "nginx",
            Self::Mitmproxy => "mitmproxy",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Direct => 0,
            Self::Brokerd => 1,
            Self::Nginx => 2,
            Self::Mitmproxy => 3,
        }
    }
}

/// One column's result for one workload.
#[derive(Clone, Debug)]
pub enum Cell {
    /// A measured value; `failures` counts requests that got anything but a clean answer.
    Value { value: f64, failures: u64 },
    /// The workload means nothing for this column (no proxy to weigh on the direct path).
    NotApplicable,
    /// The column's program could not be installed or started.
    NotInstalled(String),
    /// Deliberately not measured, with the reason.
    NotMeasured(String),
    /// The measurement failed, with the error.
    Failed(String),
}

impl Cell {
    pub fn value(value: f64) -> Self {
        Self::Value { value, failures: 0 }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Self::Value { value, .. } if value.is_finite() => Some(*value),
            _ => None,
        }
    }

    fn short(&self, unit: &str) -> String {
        match self {
            Self::Value { value, failures: 0 } => format_value(*value, unit),
            Self::Value { value, failures } => {
                format!("{} ({failures} failed)", format_value(*value, unit))
            }
            Self::NotApplicable => "n/a".into(),
            Self::NotInstalled(_) => "not installed".into(),
            Self::NotMeasured(_) => "not measured".into(),
            Self::Failed(_) => "failed".into(),
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Self::NotInstalled(why) | Self::NotMeasured(why) | Self::Failed(why) => Some(why),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Value { value, failures } => json!({ "value": value, "failures": failures }),
            Self::NotApplicable => json!({ "missing": "n/a" }),
            Self::NotInstalled(why) => json!({ "missing": "not installed", "reason": why }),
            Self::NotMeasured(why) => json!({ "missing": "not measured", "reason": why }),
            Self::Failed(why) => json!({ "missing": "failed", "reason": why }),
        }
    }
}

/// Which way is better for a row's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// A target from issue 7 or 12, judged on brokerd's cell.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// brokerd no worse than nginx. For a latency row against the same direct floor this is also
    /// "brokerd adds no more than nginx adds".
    NoWorseThanNginx,
    /// brokerd at most this multiple of nginx's value (a latency or a cost), or at least this
    /// fraction of it (a rate).
    TimesNginx(f64),
    /// brokerd strictly better than the direct path.
    BetterThanDirect,
    /// brokerd at least this many times better than mitmproxy.
    TimesMitmproxy(f64),
    /// brokerd's value at most this, in the row's unit.
    AtMost(f64),
    /// brokerd adds at most this to the direct path's value, in the row's unit (a latency).
    AddsAtMost(f64),
    /// brokerd at least this fraction of the direct path (a rate; for a latency, at most this
    /// multiple of it).
    TimesDirect(f64),
}

/// Whether a target is met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A cell it needs is missing.
    Unknown,
}

/// One workload's results.
pub struct Row {
    pub workload: String,
    pub unit: &'static str,
    pub better: Better,
    cells: [Cell; 4],
    pub targets: Vec<Target>,
}

impl Row {
    pub fn new(workload: impl Into<String>, unit: &'static str, better: Better) -> Self {
        Self {
            workload: workload.into(),
            unit,
            better,
            cells: std::array::from_fn(|_| Cell::NotApplicable),
            targets: Vec::new(),
        }
    }

    pub fn with_targets(mut self, targets: &[Target]) -> Self {
        self.targets = targets.to_vec();
        self
    }

    pub fn set(&mut self, column: Column, cell: Cell) {
        if let Some(slot) = self.cells.get_mut(column.index()) {
            *slot = cell;
        }
    }

    pub fn cell(&self, column: Column) -> &Cell {
        // `index` is always within the four columns.
        &self.cells[column.index()]
    }

    /// brokerd's value divided by `other`'s.
    pub fn ratio(&self, other: Column) -> Option<f64> {
        let brokerd = self.cell(Column::Brokerd).number()?;
        let other = self.cell(other).number()?;
        (other != 0.0).then(|| brokerd / other)
    }

    /// Whether brokerd meets `target`. A brokerd cell with failed requests meets nothing.
    pub fn verdict(&self, target: Target) -> Verdict {
        let brokerd = match self.cell(Column::Brokerd) {
            Cell::Value { failures, .. } if *failures > 0 => return Verdict::Missed,
            cell => cell.number(),
        };
        let value = |column: Column| self.cell(column).number();
        let holds = match (target, self.better) {
            (Target::NoWorseThanNginx, Better::Higher) => {
                brokerd.zip(value(Column::Nginx)).map(|(b, n)| b >= n)
            }
            (Target::NoWorseThanNginx, Better::Lower) => {
                brokerd.zip(value(Column::Nginx)).map(|(b, n)| b <= n)
            }
            (Target::TimesNginx(times), Better::Higher) => brokerd
                .zip(value(Column::Nginx))
                .map(|(b, n)| b >= times * n),
            (Target::TimesNginx(times), Better::Lower) => brokerd
                .zip(value(Column::Nginx))
                .map(|(b, n)| b <= times * n),
            (Target::BetterThanDirect, Better::Higher) => {
                brokerd.zip(value(Column::Direct)).map(|(b, d)| b > d)
            }
            (Target::BetterThanDirect, Better::Lower) => {
                brokerd.zip(value(Column::Direct)).map(|(b, d)| b < d)
            }
            (Target::TimesMitmproxy(times), Better::Higher) => brokerd
                .zip(value(Column::Mitmproxy))
                .map(|(b, m)| b >= times * m),
            (Target::TimesMitmproxy(times), Better::Lower) => brokerd
                .zip(value(Column::Mitmproxy))
                .map(|(b, m)| m >= times * b),
            (Target::AtMost(limit), _) => brokerd.map(|b| b <= limit),
            (Target::AddsAtMost(limit), Better::Lower) => brokerd
                .zip(value(Column::Direct))
                .map(|(b, d)| b - d <= limit),
            (Target::AddsAtMost(limit), Better::Higher) => brokerd
                .zip(value(Column::Direct))
                .map(|(b, d)| d - b <= limit),
            (Target::TimesDirect(times), Better::Higher) => brokerd
                .zip(value(Column::Direct))
                .map(|(b, d)| b >= times * d),
            (Target::TimesDirect(times), Better::Lower) => brokerd
                .zip(value(Column::Direct))
                .map(|(b, d)| b <= times * d),
        };
        match holds {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::Missed,
            None => Verdict::Unknown,
        }
    }

    fn target_text(&self, target: Target) -> String {
        let at_least = match self.better {
            Better::Higher => "≥",
            Better::Lower => "≤",
        };
        match target {
            Target::NoWorseThanNginx => format!("{at_least} nginx"),
            Target::TimesNginx(times) => format!("{at_least} {times}x nginx"),
            Target::BetterThanDirect => match self.better {
                Better::Higher => "> direct".into(),
                Better::Lower => "< direct".into(),
            },
            Target::TimesMitmproxy(times) => format!("{times}x mitmproxy"),
            Target::AtMost(limit) => format!("≤ {}", format_value(limit, self.unit)),
            Target::AddsAtMost(limit) => match self.better {
                Better::Lower => format!("≤ direct + {}", format_value(limit, self.unit)),
                Better::Higher => format!("≥ direct − {}", format_value(limit, self.unit)),
            },
            Target::TimesDirect(times) => format!("{at_least} {times}x direct"),
        }
    }
}

/// The whole table.
pub struct Report {
    pub rows: Vec<Row>,
}

const RATIO_COLUMNS: [Column; 3] = [Column::Direct, Column::Nginx, Column::Mitmproxy];

impl Report {
    /// A Markdown table, columns padded so it reads as well in a terminal, then a note for every
    /// cell that is missing for a reason worth telling.
    pub fn markdown(&self) -> String {
        let mut header: Vec<String> = vec!["workload".into(), "unit".into()];
        header.extend(Column::ALL.iter().map(|c| c.name().to_owned()));
        header.extend(
            RATIO_COLUMNS
                .iter()
                .map(|c| format!("brokerd/{}", c.name())),
        );
        header.extend(["target".into(), "met".into()]);
        let mut lines = vec![header];
        for row in &self.rows {
            let mut line = vec![row.workload.clone(), row.unit.to_owned()];
            line.extend(Column::ALL.iter().map(|c| row.cell(*c).short(row.unit)));
            line.extend(RATIO_COLUMNS.iter().map(|c| {
                row.ratio(*c)
                    .map_or_else(|| "–".to_owned(), |r| format!("{r:.2}"))
            }));
            let targets: Vec<String> = row.targets.iter().map(|t| row.target_text(*t)).collect();
            let verdicts: Vec<&str> = row
                .targets
                .iter()
                .map(|t| match row.verdict(*t) {
                    Verdict::Met => "yes",
                    Verdict::Missed => "NO",
                    Verdict::Unknown => "?",
                })
                .collect();
            line.push(if targets.is_empty() {
                "–".into()
            } else {
                targets.join("; ")
            });
            line.push(if verdicts.is_empty() {
                "–".into()
            } else {
                verdicts.join("; ")
            });
            lines.push(line);
        }
        let widths: Vec<usize> = (0..lines[0].len())
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l.get(i).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        // Text columns (the first two and the last two) left-aligned, numbers right-aligned.
        let is_text = |i: usize| i < 2 || i + 2 >= widths.len();
        let mut out = String::new();
        for (n, line) in lines.iter().enumerate() {
            let padded: Vec<String> = line
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (cell, width))| {
                    let pad = " ".repeat(width - cell.chars().count());
                    if is_text(i) {
                        format!(" {cell}{pad} ")
                    } else {
                        format!(" {pad}{cell} ")
                    }
                })
                .collect();
            let _ = writeln!(out, "|{}|", padded.join("|"));
            if n == 0 {
                let rule: Vec<String> = widths
                    .iter()
                    .enumerate()
                    .map(|(i, width)| {
                        if is_text(i) {
                            "-".repeat(width + 2)
                        } else {
                            format!("{}:", "-".repeat(width + 1))
                        }
                    })
                    .collect();
                let _ = writeln!(out, "|{}|", rule.join("|"));
            }
        }
        let mut notes = Vec::new();
        for row in &self.rows {
            for column in Column::ALL {
                if let Some(why) = row.cell(column).reason() {
                    let note = format!("{}: {why}", column.name());
                    // A column missing for one reason is said once, not on every row.
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                }
            }
        }
        if !notes.is_empty() {
            out.push('\n');
        }
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
        out
    }

    /// The rows as JSON values.
    pub fn rows_json(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|row| {
                    let cells: serde_json::Map<String, Value> = Column::ALL
                        .iter()
                        .map(|c| (c.name().to_owned(), row.cell(*c).to_json()))
                        .collect();
                    let ratios: serde_json::Map<String, Value> = RATIO_COLUMNS
                        .iter()
                        .map(|c| (format!("brokerd/{}", c.name()), json!(row.ratio(*c))))
                        .collect();
                    let targets: Vec<Value> = row
                        .targets
                        .iter()
                        .map(|t| {
                            let met = match row.verdict(*t) {
                                Verdict::Met => Some(true),
                                Verdict::Missed => Some(false),
                                Verdict::Unknown => None,
                            };
                            json!({ "target": row.target_text(*t), "met": met })
                        })
                        .collect();
                    json!({
                        "workload": row.workload,
                        "unit": row.unit,
                        "higher_is_better": row.better == Better::Higher,
                        "cells": cells,
                        "ratios": ratios,
                        "targets": targets,
                    })
                })
                .collect(),
        )
    }

    /// Whether any direct, brokerd or nginx cell failed or saw failed requests: the bench then
    /// exits non-zero after printing everything, so a broken path cannot pass for a slow one.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for row in &self.rows {
            for column in [Column::Direct, Column::Brokerd, Column::Nginx] {
                match row.cell(column) {
                    Cell::Failed(why) => {
                        failures.push(format!("{}, {}: {why}", row.workload, column.name()));
                    }
                    Cell::Value { failures: n, .. } if *n > 0 => failures.push(format!(
                        "{}, {}: {n} requests failed",
                        row.workload,
                        column.name()
                    )),
                    _ => {}
                }
            }
        }
        failures
    }
}

/// A value in its unit's usual precision: whole numbers with thousands separators for rates and
/// microseconds, two decimals for milliseconds, one for KiB and MiB.
fn format_value(value: f64, unit: &str) -> String {
    if !value.is_finite() {
        return "–".into();
    }
    match unit {
        "ms" => format!("{value:.2}"),
        "KiB" | "MiB" => format!("{value:.1}"),
        _ if value.abs() < 10.0 => format!("{value:.1}"),
        _ => {
            let whole = format!("{:.0}", value.abs());
            let mut grouped = String::new();
            for (i, digit) in whole.chars().enumerate() {
                if i > 0 && (whole.len() - i) % 3 == 0 {
                    grouped.push(',');
                }
                grouped.push(digit);
            }
            if value < 0.0 {
                format!("-{grouped}")
            } else {
                grouped
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(better: Better, values: [f64; 4]) -> Row {
        let mut row = Row::new("w", "req/s", better);
        for (column, value) in Column::ALL.into_iter().zip(values) {
            row.set(column, Cell::value(value));
        }
        row
    }

    #[test]
    fn judges_targets_in_the_direction_of_the_unit() {
        let faster = row(Better::Higher, [100.0, 60.0, 50.0, 2.0]);
        assert_eq!(faster.verdict(Target::NoWorseThanNginx), Verdict::Met);
        assert_eq!(faster.verdict(Target::BetterThanDirect), Verdict::Missed);
        assert_eq!(faster.verdict(Target::TimesMitmproxy(20.0)), Verdict::Met);
        assert_eq!(
            faster.verdict(Target::TimesMitmproxy(40.0)),
            Verdict::Missed
        );

        let latency = row(Better::Lower, [26.0, 177.0, 149.0, 3000.0]);
        assert_eq!(latency.verdict(Target::NoWorseThanNginx), Verdict::Missed);
        assert_eq!(latency.verdict(Target::TimesMitmproxy(10.0)), Verdict::Met);
        assert_eq!(latency.verdict(Target::AtMost(200.0)), Verdict::Met);
        assert_eq!(latency.ratio(Column::Direct), Some(177.0 / 26.0));
    }

    #[test]
    fn judges_targets_relative_to_the_direct_path() {
        let mut lag = row(Better::Lower, [20.5, 21.2, 21.9, 40.0]);
        lag.unit = "ms";
        assert_eq!(lag.verdict(Target::AddsAtMost(1.0)), Verdict::Met);
        assert_eq!(lag.verdict(Target::AddsAtMost(0.5)), Verdict::Missed);
        assert_eq!(lag.target_text(Target::AddsAtMost(1.0)), "≤ direct + 1.00");

        let throughput = row(Better::Higher, [500.0, 410.0, 450.0, 50.0]);
        assert_eq!(throughput.verdict(Target::TimesDirect(0.8)), Verdict::Met);
        assert_eq!(
            throughput.verdict(Target::TimesDirect(0.9)),
            Verdict::Missed
        );
        assert_eq!(
            throughput.target_text(Target::TimesDirect(0.8)),
            "≥ 0.8x direct"
        );

        let mut missing = throughput;
        missing.set(Column::Direct, Cell::Failed("no".into()));
        assert_eq!(missing.verdict(Target::TimesDirect(0.8)), Verdict::Unknown);
        let mut memory = Row::new("idle memory", "KiB", Better::Lower);
        memory.set(Column::Brokerd, Cell::value(26.0));
        memory.set(Column::Nginx, Cell::value(13.5));
        assert_eq!(memory.verdict(Target::TimesNginx(2.0)), Verdict::Met);
        assert_eq!(memory.verdict(Target::TimesNginx(1.25)), Verdict::Missed);
        assert_eq!(memory.target_text(Target::TimesNginx(2.0)), "≤ 2x nginx");
    }

    #[test]
    fn a_missing_cell_leaves_the_target_unknown_and_failures_miss_it() {
        let mut r = row(Better::Higher, [100.0, 60.0, 50.0, 2.0]);
        r.set(Column::Mitmproxy, Cell::NotInstalled("pip failed".into()));
        assert_eq!(r.verdict(Target::TimesMitmproxy(20.0)), Verdict::Unknown);
        assert_eq!(r.ratio(Column::Mitmproxy), None);
        r.set(
            Column::Brokerd,
            Cell::Value {
                value: 60.0,
                failures: 3,
            },
        );
        assert_eq!(r.verdict(Target::NoWorseThanNginx), Verdict::Missed);
        let report = Report { rows: vec![r] };
        assert_eq!(report.failures(), ["w, brokerd: 3 requests failed"]);
    }

    #[test]
    fn formats_values_by_unit() {
        assert_eq!(format_value(22011.53, "req/s"), "22,012");
        assert_eq!(format_value(177.0, "µs"), "177");
        assert_eq!(format_value(4.25, "µs"), "4.2");
        assert_eq!(format_value(1.234, "ms"), "1.23");
        assert_eq!(format_value(41.26, "KiB"), "41.3");
        assert_eq!(format_value(12.34, "MiB"), "12.3");
    }

    #[test]
    fn renders_one_line_per_row_and_notes_once() {
        let mut a = row(Better::Higher, [100.0, 60.0, 50.0, 2.0]);
        a.targets = vec![Target::NoWorseThanNginx];
        let mut b = row(Better::Lower, [1.0, 2.0, 3.0, 4.0]);
        a.set(Column::Mitmproxy, Cell::NotInstalled("pip failed".into()));
        b.set(Column::Mitmproxy, Cell::NotInstalled("pip failed".into()));
        let text = Report { rows: vec![a, b] }.markdown();
        assert_eq!(text.lines().filter(|l| l.starts_with("| w ")).count(), 2);
        assert_eq!(text.matches("mitmproxy: pip failed").count(), 1);
        assert!(text.contains("| ≥ nginx | yes"), "{text}");
        let rule = text.lines().nth(1).unwrap_or_default();
        assert!(rule.starts_with("|----------|-------|-------:|"), "{rule}");
    }
}
