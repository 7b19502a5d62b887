//! The soak's plot: one panel per gauge against minutes, the warm-up shaded, as an SVG drawn
//! with plotters (no font or image libraries: its built-in text estimate is enough for labels).
//! `cargo xtask soak-plot CSV` draws it again from a CSV, so anyone can regenerate it.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;

use super::sample::{GAUGES, Sample};

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 260;
const COLUMNS: usize = 2;

/// Draws `samples` into `svg`, `warm_up_seconds` shaded; `title` heads the picture.
pub fn draw(svg: &Path, samples: &[Sample], warm_up_seconds: f64, title: &str) -> Result<()> {
    if samples.is_empty() {
        anyhow::bail!("no samples to plot");
    }
    let rows = GAUGES.len().div_ceil(COLUMNS);
    let height = PANEL_HEIGHT * rows as u32 + 40;
    let root = SVGBackend::new(svg, (WIDTH, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", svg.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (header, body) = root.split_vertically(40);
    header
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let panels = body.split_evenly((rows, COLUMNS));
    let end_minutes = samples.last().map_or(1.0, |s| s.seconds / 60.0).max(0.1);
    let warm_up_minutes = (warm_up_seconds / 60.0).min(end_minutes);
    for (index, (gauge, panel)) in GAUGES.iter().zip(panels.iter()).enumerate() {
        let values: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| (s.seconds / 60.0, s.gauges[index]))
            .collect();
        let top = values.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
        let top = if top <= 0.0 { 1.0 } else { top * 1.15 };
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} ({})", gauge.column, gauge.what),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..end_minutes, 0.0..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .x_labels(8)
            .y_labels(5)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (warm_up_minutes, top)],
                RGBColor(230, 230, 230).filled(),
            )))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(values, BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?;
    }
    root.present()
        .with_context(|| format!("writing {}", svg.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_gauge_into_an_svg() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let svg = dir.path().join("soak.svg");
        let samples: Vec<Sample> = (0..30)
            .map(|i| Sample {
                seconds: f64::from(i) * 2.0,
                gauges: (0..GAUGES.len()).map(|g| (g + i as usize) as f64).collect(),
                operations: u64::from(i as u32) * 3,
                failures: 0,
            })
            .collect();
        draw(&svg, &samples, 20.0, "soak test plot").expect("drawn");
        let text = std::fs::read_to_string(&svg).expect("the SVG");
        assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
        for gauge in GAUGES {
            assert!(text.contains(gauge.column), "no panel for {}", gauge.column);
        }
        assert!(text.contains("soak test plot"));
        assert!(text.contains("<polyline"));
    }
}
