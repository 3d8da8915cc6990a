//! Training curves as a PNG (plotters, text drawn with an embedded DejaVu Sans so no system
//! font library is needed).

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        );
    });
}

/// Reads `metrics.csv` and draws loss (left) and validation Dice/IoU, and the polyp-free
/// frame specificity where measured (right).
pub fn curves(csv: &Path, png: &Path) -> Result<()> {
    register_font();
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip(1)
        // An empty field (no polyp-free source: no specificity) reads as NaN.
        .filter_map(|l| {
            l.split(',')
                .map(|v| {
                    if v.is_empty() {
                        Some(f64::NAN)
                    } else {
                        v.parse().ok()
                    }
                })
                .collect()
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let epochs = rows.len() as f64;
    let series = |col: usize| -> Vec<(f64, f64)> { rows.iter().map(|r| (r[0], r[col])).collect() };
    let root = BitMapBackend::new(png, (1200, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);

    let max_loss = rows.iter().map(|r| r[1]).fold(0.0, f64::max) * 1.05;
    let mut c = ChartBuilder::on(&left)
        .caption("training loss (BCE + Dice)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(1.0..epochs.max(2.0), 0.0..max_loss.max(1e-3))?;
    c.configure_mesh().x_desc("epoch").draw()?;
    c.draw_series(LineSeries::new(series(1), &RED))?;

    let mut c = ChartBuilder::on(&right)
        .caption("validation", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(1.0..epochs.max(2.0), 0.0..1.0)?;
    c.configure_mesh().x_desc("epoch").draw()?;
    c.draw_series(LineSeries::new(series(2), &BLUE))?
        .label("mean Dice")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(series(3), &GREEN))?
        .label("mean IoU")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    let spec: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r.len() > 7 && r[7].is_finite())
        .map(|r| (r[0], r[7]))
        .collect();
    if !spec.is_empty() {
        c.draw_series(LineSeries::new(spec, &MAGENTA))?
            .label("frame specificity (polyp-free)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws a ROC curve (false-positive rate against true-positive rate) with its AUROC.
pub fn roc(points: &[(f64, f64)], auroc: Option<f64>, title: &str, png: &Path) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(png, (520, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = match auroc {
        Some(a) => format!("{title}: AUROC {a:.4}"),
        None => title.to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1.001f64)?;
    chart
        .configure_mesh()
        .x_desc("false-positive rate (polyp-free frames)")
        .y_desc("true-positive rate (polyp frames)")
        .draw()?;
    chart.draw_series(LineSeries::new(
        [(0.0, 0.0), (1.0, 1.0)],
        RGBColor(180, 180, 180),
    ))?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        BLUE.stroke_width(2),
    ))?;
    root.present()
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}
