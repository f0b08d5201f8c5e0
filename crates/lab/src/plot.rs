//! SVG charts, for what a learner would rather look at than read: a
//! bench's latency against concurrency, and a counter, a backlog or a
//! latency over time while something is broken on purpose.

use std::path::Path;

use plotters::prelude::*;

use crate::bench::Row;

/// Draws p50 (solid) and p99 (thin) latency against concurrency, one panel
/// per operation and one colour per variant.
pub fn latency_by_concurrency(path: &Path, title: &str, rows: &[Row]) -> anyhow::Result<()> {
    let mut ops: Vec<&str> = rows.iter().map(|r| r.op.as_str()).collect();
    ops.dedup();
    let mut variants: Vec<&str> = Vec::new();
    for r in rows {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
    }
    let root = SVGBackend::new(path, (420 * ops.len().max(1) as u32, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let panels = root.split_evenly((1, ops.len().max(1)));
    for (panel, op) in panels.iter().zip(&ops) {
        let cells: Vec<&Row> = rows.iter().filter(|r| r.op == *op).collect();
        let max_c = cells.iter().map(|r| r.concurrency).max().unwrap_or(1) as f64;
        let max_ms = cells.iter().map(|r| r.p99_us).max().unwrap_or(1) as f64 / 1000.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(*op, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d((0.8f64..max_c * 1.25).log_scale(), 0.0..max_ms * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("concurrency")
            .y_desc("latency (ms)")
            .draw()?;
        for (i, variant) in variants.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            let mine: Vec<&&Row> = cells.iter().filter(|r| r.variant == *variant).collect();
            let p50: Vec<(f64, f64)> = mine
                .iter()
                .map(|r| (r.concurrency as f64, r.p50_us as f64 / 1000.0))
                .collect();
            let p99: Vec<(f64, f64)> = mine
                .iter()
                .map(|r| (r.concurrency as f64, r.p99_us as f64 / 1000.0))
                .collect();
            chart
                .draw_series(LineSeries::new(p50.clone(), colour.stroke_width(2)))?
                .label(format!("{variant} p50"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], colour.stroke_width(2))
                });
            chart.draw_series(p50.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
            chart
                .draw_series(LineSeries::new(p99, colour.stroke_width(1)))?
                .label(format!("{variant} p99"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], colour.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// One chart of [`over_time`]: its title, the unit of its y axis, and its
/// lines, each a label and (seconds since the start, value) points.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
}

/// Draws each panel as lines against time, the panels stacked one above
/// the other on a shared time axis.
pub fn over_time(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let end = panels
        .iter()
        .flat_map(|p| p.lines.iter().flat_map(|(_, points)| points))
        .map(|&(t, _)| t)
        .fold(1.0f64, f64::max);
    let rows = panels.len().max(1);
    let root = SVGBackend::new(path, (900, 220 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    for (area, panel) in root.split_evenly((rows, 1)).iter().zip(panels) {
        let top = panel
            .lines
            .iter()
            .flat_map(|(_, points)| points)
            .map(|&(_, v)| v)
            .fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..(top * 1.1).max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(panel.unit.as_str())
            .draw()?;
        for (i, (label, points)) in panel.lines.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart holds one line per series, drawn through its points.
    #[test]
    fn over_time_draws_every_panel_and_line() {
        let path = std::env::temp_dir().join(format!("lab-plot-{}.svg", std::process::id()));
        let panels = [
            Panel {
                title: "pending".into(),
                unit: "views".into(),
                lines: vec![("pending".into(), vec![(0.0, 0.0), (1.0, 40.0), (2.0, 5.0)])],
            },
            Panel {
                title: "lag".into(),
                unit: "ms".into(),
                lines: vec![
                    ("lag ms".into(), vec![(0.0, 0.0), (1.0, 900.0), (2.0, 10.0)]),
                    ("other".into(), vec![(0.0, 1.0), (2.0, 1.0)]),
                ],
            },
        ];
        over_time(&path, "write-behind", &panels).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for text in ["write-behind", "pending", "lag ms", "other", "seconds"] {
            assert!(svg.contains(text), "{text} missing from the chart");
        }
        // Each line drawn, and its legend entry; the grid is drawn thinner.
        let drawn = svg
            .split("<polyline")
            .filter(|element| element.contains(r#"stroke-width="2""#))
            .count();
        assert_eq!(drawn, 3 + 3, "{svg}");
    }
}
