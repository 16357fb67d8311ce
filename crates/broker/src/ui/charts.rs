//! The dashboard's charts: time series over the last [`WINDOW_MS`] in
//! buckets (pure functions of what the viewer may see), drawn as SVG by
//! plotters on the server, so the browser needs no chart script.

use leasehold_service::SharedClock;
use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::prelude::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// The charts show the last 15 minutes...
pub(crate) const WINDOW_MS: u64 = 15 * 60 * 1000;
/// ...in buckets of 10 seconds.
pub(crate) const BUCKET_MS: u64 = 10 * 1000;
const BUCKETS: u64 = WINDOW_MS / BUCKET_MS;
/// The find-latency recorder keeps at most this many samples.
const MAX_FIND_SAMPLES: usize = 8192;
const CHART_SIZE_PX: (u32, u32) = (640, 240);
/// At most this many hosts in the utilisation chart (the busiest).
pub(crate) const MAX_CHART_HOSTS: usize = 24;
/// The utilisation chart has room for at least this many bars.
const MIN_BAR_SLOTS: usize = 4;

/// Recent finds: when (broker clock) and how long they took.
pub(crate) struct FindLatencies {
    clock: SharedClock,
    samples: Mutex<VecDeque<(u64, u64)>>,
}

impl FindLatencies {
    pub(crate) fn new(clock: SharedClock) -> Self {
        FindLatencies {
            clock,
            samples: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() >= MAX_FIND_SAMPLES {
            samples.pop_front();
        }
        samples.push_back((self.clock.now_ms(), micros));
    }

    pub(crate) fn snapshot(&self) -> Vec<(u64, u64)> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().copied().collect()
    }
}

/// The bucket of `at_ms` in the window ending at `now_ms`, if inside it.
fn bucket_of(at_ms: u64, now_ms: u64) -> Option<usize> {
    let window_start_ms = now_ms.saturating_sub(WINDOW_MS);
    if at_ms < window_start_ms || at_ms > now_ms {
        return None;
    }
    Some((((at_ms - window_start_ms) / BUCKET_MS).min(BUCKETS - 1)) as usize)
}

/// The end of each bucket, in ms.
fn bucket_ends_ms(now_ms: u64) -> impl Iterator<Item = u64> {
    let window_start_ms = now_ms.saturating_sub(WINDOW_MS);
    (1..=BUCKETS).map(move |i| window_start_ms + i * BUCKET_MS)
}

/// How many of `leases` (start, release if any) were active at the end of
/// each bucket.
pub(crate) fn active_leases_series(leases: &[(u64, Option<u64>)], now_ms: u64) -> Vec<u64> {
    bucket_ends_ms(now_ms)
        .map(|end_ms| {
            leases
                .iter()
                .filter(|(start, release)| *start <= end_ms && release.is_none_or(|r| r > end_ms))
                .count() as u64
        })
        .collect()
}

/// The sum of `amounts` (at, micros) falling in each bucket.
pub(crate) fn amount_series(amounts: &[(u64, u64)], now_ms: u64) -> Vec<u64> {
    let mut series = vec![0u64; BUCKETS as usize];
    for (at_ms, micros) in amounts {
        if let Some(bucket) = bucket_of(*at_ms, now_ms) {
            series[bucket] = series[bucket].saturating_add(*micros);
        }
    }
    series
}

/// The median and the largest latency (µs) of the samples in each bucket.
pub(crate) fn latency_series(samples: &[(u64, u64)], now_ms: u64) -> (Vec<u64>, Vec<u64>) {
    let mut buckets = vec![Vec::new(); BUCKETS as usize];
    for (at_ms, micros) in samples {
        if let Some(bucket) = bucket_of(*at_ms, now_ms) {
            buckets[bucket].push(*micros);
        }
    }
    let mut medians = Vec::with_capacity(buckets.len());
    let mut maxima = Vec::with_capacity(buckets.len());
    for mut bucket in buckets {
        bucket.sort_unstable();
        medians.push(bucket.get(bucket.len() / 2).copied().unwrap_or(0));
        maxima.push(bucket.last().copied().unwrap_or(0));
    }
    (medians, maxima)
}

/// A line of a chart: its name, colour and one value per bucket.
pub(crate) struct Line<'a> {
    pub name: &'a str,
    pub colour: RGBColor,
    pub values: &'a [u64],
}

pub(crate) const BLUE_LINE: RGBColor = RGBColor(37, 99, 235);
pub(crate) const ORANGE_LINE: RGBColor = RGBColor(234, 88, 12);

/// A line chart over the window, as an SVG document, or why not.
pub(crate) fn line_chart_svg(title: &str, y_description: &str, lines: &[Line<'_>]) -> String {
    let mut svg = String::new();
    let drawn = draw_line_chart(&mut svg, title, y_description, lines);
    drawn
        .map(|()| svg)
        .unwrap_or_else(|e| chart_error(title, &e))
}

fn draw_line_chart(
    svg: &mut String,
    title: &str,
    y_description: &str,
    lines: &[Line<'_>],
) -> Result<(), String> {
    let top = lines
        .iter()
        .flat_map(|l| l.values.iter().copied())
        .max()
        .unwrap_or(0);
    // Headroom above the highest point, and never an empty range.
    let y_max = (top + top / 5).max(1);
    let root = SVGBackend::with_string(svg, CHART_SIZE_PX).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let window_s = (WINDOW_MS / 1000) as i64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(-window_s..0i64, 0u64..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|seconds| format!("{} min", seconds / 60))
        .y_desc(y_description)
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| e.to_string())?;
    let bucket_s = (BUCKET_MS / 1000) as i64;
    for line in lines {
        let points = line
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (-window_s + (i as i64 + 1) * bucket_s, *v));
        let colour = line.colour;
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(line.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.2))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// A bar per host: the percentage of its CPU that is leased.
pub(crate) fn utilisation_chart_svg(hosts: &[(String, u64)]) -> String {
    let title = "Utilisation per host (leased % of CPU)";
    let mut svg = String::new();
    let drawn = draw_utilisation_chart(&mut svg, title, hosts);
    drawn
        .map(|()| svg)
        .unwrap_or_else(|e| chart_error(title, &e))
}

fn draw_utilisation_chart(
    svg: &mut String,
    title: &str,
    hosts: &[(String, u64)],
) -> Result<(), String> {
    let root = SVGBackend::with_string(svg, CHART_SIZE_PX).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    // At least a few slots, so one host's bar is not the chart's width;
    // an integer range's coordinates include its end: 0..n-1 is n slots.
    let slots = hosts.len().max(MIN_BAR_SLOTS);
    let last_bar = (slots - 1) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(40)
        .build_cartesian_2d((0..last_bar).into_segmented(), 0u64..100u64)
        .map_err(|e| e.to_string())?;
    let label = |value: &SegmentValue<u32>| match value {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => hosts
            .get(*i as usize)
            .map(|(name, _)| name.clone())
            .unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(slots)
        .x_label_formatter(&label)
        .y_desc("%")
        .draw()
        .map_err(|e| e.to_string())?;
    let bars = hosts.iter().enumerate().map(|(i, (_, percent))| {
        let i = i as u32;
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0),
                (SegmentValue::Exact(i + 1), (*percent).min(100)),
            ],
            BLUE_LINE.filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        bar
    });
    chart.draw_series(bars).map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn chart_error(title: &str, error: &str) -> String {
    tracing::warn!(chart = title, %error, "cannot draw a dashboard chart");
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 10_000_000;

    #[test]
    fn a_lease_counts_while_active_and_not_after_release() {
        let start = NOW_MS - 60_000;
        let release = NOW_MS - 30_000;
        let series = active_leases_series(&[(start, Some(release)), (start, None)], NOW_MS);
        assert_eq!(series.len() as u64, BUCKETS);
        assert_eq!(*series.last().unwrap(), 1, "the released one is gone");
        let at_45_s_ago = series[(BUCKETS - 5) as usize];
        assert_eq!(at_45_s_ago, 2, "both active 45 s ago");
        assert_eq!(series[0], 0, "neither before its start");
    }

    #[test]
    fn amounts_land_in_their_bucket_and_outside_the_window_not_at_all() {
        let series = amount_series(
            &[
                (NOW_MS, 5),
                (NOW_MS - 1, 7),
                (NOW_MS - WINDOW_MS - 1, 1_000),
            ],
            NOW_MS,
        );
        assert_eq!(*series.last().unwrap(), 12);
        assert_eq!(series.iter().sum::<u64>(), 12);
    }

    #[test]
    fn latency_buckets_give_median_and_largest() {
        let samples = [(NOW_MS, 10), (NOW_MS, 30), (NOW_MS, 20)];
        let (medians, maxima) = latency_series(&samples, NOW_MS);
        assert_eq!(*medians.last().unwrap(), 20);
        assert_eq!(*maxima.last().unwrap(), 30);
        assert_eq!(medians[0], 0);
    }

    #[test]
    fn charts_are_svg_with_their_titles_and_host_names() {
        let values = vec![1; BUCKETS as usize];
        let svg = line_chart_svg(
            "Active leases",
            "leases",
            &[Line {
                name: "active",
                colour: BLUE_LINE,
                values: &values,
            }],
        );
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("Active leases"));
        let bars = utilisation_chart_svg(&[("host-a".into(), 50), ("host-b".into(), 0)]);
        assert!(bars.contains("host-a") && bars.contains("host-b"));
        let one_host = utilisation_chart_svg(&[("only".into(), 70)]);
        assert!(one_host.contains("only") && one_host.contains("<rect"));
    }

    #[test]
    fn the_recorder_keeps_a_bounded_number_of_samples() {
        let clock = leasehold_service::SimulatedClock::starting_at(NOW_MS).shared();
        let finds = FindLatencies::new(clock);
        for _ in 0..MAX_FIND_SAMPLES + 10 {
            finds.record(Duration::from_micros(3));
        }
        let samples = finds.snapshot();
        assert_eq!(samples.len(), MAX_FIND_SAMPLES);
        assert_eq!(samples[0], (NOW_MS, 3));
    }
}
