//! SVG plots (plotters' SVG backend: text is SVG `<text>`, so no font files or system libraries).
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

fn range(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (lo - pad, hi + pad)
}

/// A point with its standard error (0: none drawn).
pub type Point = (f64, f64, f64);

/// Lines with markers, one per series `(label, points)`; points are drawn in the order given.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let s: Vec<(String, Vec<Point>)> = series
        .iter()
        .map(|(l, p)| (l.clone(), p.iter().map(|&(x, y)| (x, y, 0.0)).collect()))
        .collect();
    with_errors(path, title, x_label, y_label, &s, 0.0)
}

/// Accuracy-style plot: each series a colour and a marker shape of its own, points joined in the order
/// given, a vertical bar of +-1 standard error on every point, the legend to the right of the plot
/// (never over the data). The y range covers every error bar and spans at least `min_y_span`, so
/// that differences within noise are not stretched over the whole height.
pub fn with_errors(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<Point>)],
    min_y_span: f64,
) -> Result<()> {
    let all = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (x0, x1) = range(all.clone().map(|p| p.0));
    let (mut y0, mut y1) = range(all.clone().flat_map(|p| [p.1 - p.2, p.1 + p.2]));
    if y1 - y0 < min_y_span {
        let mid = 0.5 * (y0 + y1);
        (y0, y1) = (mid - 0.5 * min_y_span, mid + 0.5 * min_y_span);
    }
    let legend_w = 40 + 8 * series.iter().map(|(l, _)| l.len()).max().unwrap_or(4) as u32;
    let root = SVGBackend::new(path, (720 + legend_w, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(720);
    let mut chart = ChartBuilder::on(&left)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(err)?;
    for (i, (_, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        if pts.len() > 1 {
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, p.1)),
                    c.stroke_width(2),
                ))
                .map_err(err)?;
        }
        for p in pts.iter().filter(|p| p.2 > 0.0) {
            let (x, lo) = chart.backend_coord(&(p.0, p.1 - p.2));
            let (_, hi) = chart.backend_coord(&(p.0, p.1 + p.2));
            for seg in [
                vec![(x, lo), (x, hi)],
                vec![(x - 4, lo), (x + 4, lo)],
                vec![(x - 4, hi), (x + 4, hi)],
            ] {
                left.draw(&PathElement::new(seg, c.stroke_width(1)))
                    .map_err(err)?;
            }
        }
        for p in pts {
            left.draw(&marker(i, chart.backend_coord(&(p.0, p.1)), c))
                .map_err(err)?;
        }
    }
    // The legend, outside the data area.
    for (i, (label, _)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let y = 60 + 24 * i as i32;
        right.draw(&marker(i, (16, y), c)).map_err(err)?;
        right
            .draw(&Text::new(label.as_str(), (30, y - 7), ("sans-serif", 14)))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Marker `i` (circle, triangle, square, diamond, cross; cycling) centred at a pixel position.
fn marker<'a, DB: DrawingBackend + 'a>(
    i: usize,
    (x, y): (i32, i32),
    c: RGBColor,
) -> DynElement<'a, DB, (i32, i32)> {
    let r = 5;
    match (i / COLORS.len() + i) % 5 {
        0 => Circle::new((x, y), r, c.filled()).into_dyn(),
        1 => Polygon::new(
            vec![(x, y - r - 1), (x - r, y + r), (x + r, y + r)],
            c.filled(),
        )
        .into_dyn(),
        2 => Rectangle::new([(x - r, y - r), (x + r, y + r)], c.filled()).into_dyn(),
        3 => Polygon::new(
            vec![
                (x, y - r - 1),
                (x + r + 1, y),
                (x, y + r + 1),
                (x - r - 1, y),
            ],
            c.filled(),
        )
        .into_dyn(),
        _ => PathElement::new(
            vec![
                (x - r, y - r),
                (x + r, y + r),
                (x, y),
                (x + r, y - r),
                (x - r, y + r),
            ],
            c.stroke_width(2),
        )
        .into_dyn(),
    }
}

/// Overlaid histograms (as step outlines of bin fractions) of several samples over a common range.
pub fn histograms(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
    bins: usize,
) -> Result<()> {
    let (x0, x1) = range(series.iter().flat_map(|(_, v)| v.iter().copied()));
    let bins = bins.max(1);
    let width = (x1 - x0) / bins as f64;
    let hist: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, v)| {
            let mut h = vec![0.0; bins];
            for &x in v {
                let b = (((x - x0) / width) as usize).min(bins - 1);
                h[b] += 1.0;
            }
            let n = v.len().max(1) as f64;
            h.iter().map(|c| c / n).collect()
        })
        .collect();
    let ymax = hist.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) * 1.1 + 1e-9;
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("fraction")
        .draw()
        .map_err(err)?;
    for (i, ((label, _), h)) in series.iter().zip(&hist).enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut pts = vec![(x0, 0.0)];
        for (b, &v) in h.iter().enumerate() {
            let l = x0 + b as f64 * width;
            pts.push((l, v));
            pts.push((l + width, v));
        }
        pts.push((x1, 0.0));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(err)?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
