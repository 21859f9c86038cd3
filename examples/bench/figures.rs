//! The pictures, drawn by the benchmark itself as SVG (plotters' SVG backend only): where
//! a table is hard to read, throughput against connections and latency percentiles.

use std::error::Error;
use std::path::Path;

use plotters::prelude::*;

use crate::report::{STORES, med};
use crate::{Kind, Results, SWEEP};

type Drawn = Result<(), Box<dyn Error>>;

/// Draws every figure into `dir`; the (title, file name) of each one drawn.
pub fn draw(results: &Results, dir: &Path) -> Vec<(String, String)> {
    let mut drawn = Vec::new();
    let mut attempt = |title: &str, file: &str, f: &dyn Fn(&Path) -> Drawn| match f(&dir.join(file)) {
        Ok(()) => drawn.push((title.to_owned(), file.to_owned())),
        Err(e) => eprintln!("figure {file} not drawn: {e}"),
    };
    attempt(
        "Throughput against connections",
        "throughput-connections.svg",
        &|path| throughput(results, path),
    );
    attempt(
        "Latency percentiles at the peak",
        "latency-percentiles.svg",
        &|path| percentiles(results, path),
    );
    if results.soak.is_some() {
        attempt("RSS through the soak", "soak-rss.svg", &|path| {
            soak(results, path)
        });
    }
    drawn
}

/// Colours that stay apart on white (the stock palettes have a pale yellow).
const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(0, 0, 0),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Category axes (connections, percentiles): the label of the category at `x`.
fn category(x: f64, names: &[String]) -> String {
    names
        .iter()
        .zip(0u32..)
        .find(|(_, at)| (x - f64::from(*at)).abs() < 0.05)
        .map_or_else(String::new, |(name, _)| name.clone())
}

fn throughput(results: &Results, path: &Path) -> Drawn {
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    for (panel, kind) in panels.iter().zip([Kind::Create, Kind::Lookup]) {
        let top = results
            .sweep
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.rate)
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{} (closed loop)", kind.name()), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.2f64..2.2f64, 0f64..top * 1.15)?;
        let names: Vec<String> = SWEEP.iter().map(ToString::to_string).collect();
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("connections")
            .y_desc("requests/s")
            .x_labels(SWEEP.len())
            .x_label_formatter(&|x| category(*x, &names))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (i, store) in STORES.iter().enumerate() {
            let points: Vec<(f64, f64)> = SWEEP
                .iter()
                .zip(0u32..)
                .filter_map(|(c, at)| {
                    results
                        .sweep
                        .iter()
                        .find(|s| s.store == *store && s.kind == kind && s.connections == *c)
                        .map(|s| (f64::from(at), s.rate))
                })
                .collect();
            let c = color(i);
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                .label(*store)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

const PERCENTILES: [&str; 4] = ["p50", "p90", "p99", "p99.9"];

fn percentiles(results: &Results, path: &Path) -> Drawn {
    // The y axis reaches 20× the highest p99.9 so that the legend sits above the lines.
    let root = SVGBackend::new(path, (1200, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let kinds = [
        Kind::Healthz,
        Kind::Create,
        Kind::Lookup,
        Kind::Hot,
        Kind::Winners,
        Kind::Mixed,
    ];
    let series = |store: &str, kind: Kind| -> Vec<(f64, f64)> {
        let fields: [fn(&crate::Row) -> Option<f64>; 4] = [
            |r| Some(r.p50),
            |r| Some(r.p90),
            |r| Some(r.p99),
            |r| Some(r.p999),
        ];
        fields
            .iter()
            .zip([0.0, 1.0, 2.0, 3.0])
            .filter_map(|(f, x)| med(results, store, kind, f).map(|ms| (x, ms.max(0.01))))
            .collect()
    };
    let top = results.rows.iter().map(|r| r.p999).fold(1.0, f64::max);
    let bottom = results
        .rows
        .iter()
        .map(|r| r.p50)
        .filter(|ms| *ms > 0.0)
        .fold(top, f64::min);
    let names: Vec<String> = PERCENTILES.iter().map(ToString::to_string).collect();
    for (panel, store) in panels.iter().zip(STORES) {
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{store} (medians over rounds)"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.2f64..3.2f64, (bottom / 2.0..top * 20.0).log_scale())?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(4)
            .x_label_formatter(&|x| category(*x, &names))
            .y_desc("latency ms (log)")
            .y_label_formatter(&|y| format!("{y}"))
            .draw()?;
        for (i, kind) in kinds.iter().enumerate() {
            let points = series(store, *kind);
            if points.is_empty() {
                continue;
            }
            let c = color(i);
            chart
                .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                .label(kind.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn soak(results: &Results, path: &Path) -> Drawn {
    let Some(soak) = &results.soak else {
        return Ok(());
    };
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let end = soak.samples.last().map_or(1.0, |s| s.0).max(1.0);
    let top = soak
        .samples
        .iter()
        .flat_map(|(_, r)| r.iter().copied())
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("RSS of each instance through the soak", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end, 0f64..top * 1.2)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("VmRSS MiB")
        .draw()?;
    for instance in 0..3 {
        let c = color(instance);
        let points: Vec<(f64, f64)> = soak
            .samples
            .iter()
            .filter_map(|(t, r)| r.get(instance).map(|m| (*t, *m)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))?
            .label(format!("instance {}", instance + 1))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    root.present()?;
    Ok(())
}
