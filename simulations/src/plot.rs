//! `--plot`: the time until every node of a site is staged, against the
//! number of nodes per site, with the lower bound and the naive case.

use std::path::Path;

use anyhow::{anyhow, Result};
use lanup_simulations::scenario::Fleet;
use lanup_simulations::{bound_s, naive_s, simulate_fleet, SiteModel};
use plotters::prelude::*;

/// At most this many sites per point: the median settles well before.
const SITES_PER_POINT: usize = 25;

pub(crate) fn draw(path: &Path, fleet: &Fleet) -> Result<()> {
    let max = fleet.site.nodes.max(2);
    let mut counts: Vec<usize> = (1..=max).filter(|n| *n <= 10 || n % 5 == 0).collect();
    if counts.last() != Some(&max) {
        counts.push(max);
    }
    let mut lanup = Vec::new();
    let mut bound = Vec::new();
    let mut naive = Vec::new();
    for &n in &counts {
        let m = SiteModel {
            nodes: n,
            ..fleet.site.clone()
        };
        let r = simulate_fleet(&m, fleet.sites.min(SITES_PER_POINT), fleet.seed);
        lanup.push((n as f64, r.staged_p50_s));
        bound.push((n as f64, bound_s(&m)));
        naive.push((n as f64, naive_s(&m)));
    }
    let all = lanup.iter().chain(&bound).chain(&naive).map(|p| p.1);
    let top = all.clone().fold(1.0f64, f64::max) * 1.5;
    let low = all.fold(f64::INFINITY, f64::min).max(0.01) / 1.5;
    let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "{:.0} MiB release, uplink {:.1} Mbit/s: time until every node is staged",
        fleet.site.size as f64 / (1 << 20) as f64,
        fleet.site.uplink * 8.0 / 1e6
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..(max as f64 + 0.5), (low..top).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("nodes per site")
        .y_desc("seconds (log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    for (points, colour, label) in [
        (&naive, RED, "naive: every node from the origin"),
        (&lanup, BLUE, "lanup (simulated, median over sites)"),
        (&bound, BLACK, "lower bound max(S/W, S/d, N·S/(W+Σu))"),
    ] {
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
