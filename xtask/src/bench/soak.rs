//! `cargo xtask soak [--minutes N] [--rate R]`: does the daemon stay flat under hours of
//! ordinary traffic? A leak of descriptors or memory per connection shows up only after many
//! connections, so this runs the same two-node cluster as `bench` (release daemons, one per
//! node) for N minutes with:
//!
//! - a steady churn of short connections in both directions between the nodes (`meshload
//!   churn`, R per second in all, each echoing 4 KiB of its own pattern, compared);
//! - two long connections (one each way) carrying 256 KiB requests and their echoes at 20 per
//!   second throughout (`meshload rr`, which fails on any I/O error);
//!
//! and samples, every 10 s, both daemons' open descriptors (`/proc/PID/fd`), RSS and
//! anonymous resident memory, and the allocator's heap in use and free
//! (`ztunnel_heap_bytes` on the metrics port; what the anonymous memory is made of). It passes when no connection failed and each series is flat:
//! the mean of the last 10 minutes within ±5% of the mean of minutes 5 to 10 (runs of 20
//! minutes or more); shorter runs compare the last third with the middle third instead.
//! Descriptors count the connections in flight as well, so they may also differ by up to
//! [`FD_SLACK`]. Results: a table on stdout, JSON and an SVG chart under `<target>/bench/`.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::cluster::{Cluster, ClusterSpec, Pod, PodSpec};
use plotters::prelude::*;
use serde_json::{json, Value};

use super::probe;

/// Echo port of the servers (`meshapp serve`) in both pods.
const PORT: u16 = 8080;
/// Seconds between samples.
const SAMPLE_SECS: u64 = 10;
/// Allowed change of a series' mean between the two windows.
const FLAT_PCT: f64 = 5.0;
/// Descriptors a series may differ by whatever the percentage (connections in flight).
pub const FD_SLACK: f64 = 16.0;

#[derive(Debug)]
struct Opts {
    minutes: f64,
    rate: f64,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        minutes: 30.0,
        rate: 200.0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<f64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse().with_context(|| format!("{name} `{v}`"))
        };
        match a.as_str() {
            "--minutes" => o.minutes = val("--minutes")?,
            "--rate" => o.rate = val("--rate")?.max(1.0),
            other => bail!(
                "unknown argument `{other}`; usage: cargo xtask soak [--minutes N] [--rate R]"
            ),
        }
    }
    if o.minutes < 1.5 {
        bail!(
            "--minutes {}: at least 1.5 (three windows of samples)",
            o.minutes
        );
    }
    Ok(o)
}

/// Reads one series out of a sample.
type Field = fn(&Sample) -> f64;

/// One sample of one daemon.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    fds: f64,
    rss: f64,
    anon: f64,
    /// The allocator's heap in use and free (MiB); NaN when the scrape failed.
    heap_in_use: f64,
    heap_free: f64,
}

fn sample(cluster: &Cluster, node: usize, pid: u32, secs: f64) -> Result<Sample> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd (did the daemon exit?)"))?
        .count() as f64;
    let m = probe::mem(pid)?;
    let (heap_in_use, heap_free) = probe::heap(cluster, node);
    Ok(Sample {
        secs,
        fds,
        rss: m.rss,
        anon: m.anon,
        heap_in_use,
        heap_free,
    })
}

/// The windows compared: (baseline, last) in seconds from the start, and how they were chosen.
fn windows(total_secs: f64) -> ((f64, f64), (f64, f64), &'static str) {
    if total_secs >= 20.0 * 60.0 {
        (
            (300.0, 600.0),
            (total_secs - 600.0, total_secs),
            "minutes 5-10 vs the last 10 minutes",
        )
    } else {
        let third = total_secs / 3.0;
        (
            (third, 2.0 * third),
            (2.0 * third, total_secs),
            "middle third vs last third (run shorter than 20 minutes)",
        )
    }
}

fn mean_in(s: &[Sample], (from, to): (f64, f64), f: Field) -> f64 {
    let v: Vec<f64> = s
        .iter()
        .filter(|x| x.secs >= from && x.secs <= to)
        .map(f)
        .collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Flatness verdicts of one daemon's series: (series, baseline mean, last mean, change %, ok).
fn flatness(s: &[Sample], total_secs: f64) -> Vec<(&'static str, f64, f64, f64, bool)> {
    let (base, last, _) = windows(total_secs);
    let series: [(&str, Field, f64); 3] = [
        ("fds", |x| x.fds, FD_SLACK),
        ("rss_mib", |x| x.rss, 0.0),
        ("anon_mib", |x| x.anon, 0.0),
    ];
    series
        .into_iter()
        .map(|(name, f, slack)| {
            let (b, l) = (mean_in(s, base, f), mean_in(s, last, f));
            let pct = (l - b) / b * 100.0;
            let ok = pct.abs() <= FLAT_PCT || (l - b).abs() <= slack;
            (name, b, l, pct, ok && pct.is_finite())
        })
        .collect()
}

fn meshload(pod: &Pod, args: &[String]) -> Result<Child> {
    probe::meshload_spawn(pod, args)
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

pub fn run(args: &[String]) -> Result<bool> {
    let o = parse(args)?;
    super::prepare(false)?;
    let load_before = super::uptime();
    let spec = ClusterSpec::new(2)
        .namespace("soak", true)
        .pod(PodSpec::new("soak/a", 1).sa("a"))
        .pod(PodSpec::new("soak/b", 2).sa("b"));
    let mut cluster = Cluster::start(spec)?;
    cluster.start_all_daemons()?;
    let pods = [cluster.pod("soak/a").clone(), cluster.pod("soak/b").clone()];
    let _servers = [pods[0].serve(PORT, "a")?, pods[1].serve(PORT, "b")?];
    let pid = |n: usize| {
        cluster
            .daemon(n)
            .pid()
            .with_context(|| format!("daemon {n} has no pid"))
    };
    let pids = [pid(1)?, pid(2)?];
    let secs = o.minutes * 60.0;
    let to = |p: &Pod| format!("{}:{PORT}", p.ip);
    // The load must pass the daemons: a transfer shows up in the client node's access log.
    let before = cluster.daemon(1).access_logs().len();
    pods[0]
        .send(&mesh_tests::app::SendOpts::to(&to(&pods[1])))?
        .check()?;
    std::thread::sleep(Duration::from_millis(300));
    if cluster.daemon(1).access_logs().len() <= before {
        bail!("the check transfer did not pass node 1's daemon: the pods are not meshed");
    }
    eprintln!(
        "soak: {:.1} minutes, {} short connections/s, daemons {pids:?}",
        o.minutes, o.rate
    );
    // Churn both ways, half the rate each; one long connection each way.
    let mut churn = Vec::new();
    let mut long = Vec::new();
    for (from, target) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
        let (rate, s) = ((o.rate / 2.0).to_string(), secs.to_string());
        churn.push(meshload(
            from,
            &strings(&["churn", "--to", &to(target), "--rate", &rate, "--secs", &s]),
        )?);
        long.push(meshload(
            from,
            &strings(&[
                "rr",
                "--to",
                &to(target),
                "--size",
                "262144",
                "--rate",
                "20",
                "--secs",
                &s,
                "--warmup",
                "0",
            ]),
        )?);
    }
    let start = Instant::now();
    let mut series: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut tick = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let t = start.elapsed().as_secs_f64();
        for (i, pid) in pids.iter().enumerate() {
            series[i].push(sample(&cluster, i + 1, *pid, t)?);
        }
        if tick.is_multiple_of(6) {
            let (a, b) = (series[0].last(), series[1].last());
            if let (Some(a), Some(b)) = (a, b) {
                eprintln!(
                    "soak: {:>5.1} min  node1 fds {} rss {:.1} anon {:.1} heap {:.2}+{:.2} MiB | node2 fds {} rss {:.1} anon {:.1} heap {:.2}+{:.2} MiB",
                    t / 60.0, a.fds, a.rss, a.anon, a.heap_in_use, a.heap_free,
                    b.fds, b.rss, b.anon, b.heap_in_use, b.heap_free
                );
            }
        }
        tick += 1;
        let due = start + Duration::from_secs(SAMPLE_SECS * tick);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let total = start.elapsed().as_secs_f64();
    let mut churn_results = Vec::new();
    for c in churn {
        churn_results.push(probe::meshload_result(c)?);
    }
    let mut long_results = Vec::new();
    for l in long {
        // A long connection that broke is a failure of the run, not of the command.
        long_results
            .push(probe::meshload_result(l).unwrap_or_else(|e| json!({"error": format!("{e:#}")})));
    }
    let load_after = super::uptime();
    drop(cluster);

    let count = |v: &[Value], k: &str| v.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).sum::<f64>();
    let (ok, failed) = (
        count(&churn_results, "connections"),
        count(&churn_results, "failed"),
    );
    let long_failed = long_results
        .iter()
        .filter(|r| r.get("error").is_some())
        .count();
    let (_, _, how) = windows(total);
    let mut pass = failed == 0.0 && long_failed == 0;
    let mut table = format!(
        "\n| daemon | series | baseline mean | last mean | change % | flat (±{FLAT_PCT}%) |\n|---|---|---|---|---|---|\n"
    );
    let mut flat_json = Vec::new();
    for (i, s) in series.iter().enumerate() {
        for (name, b, l, pct, ok) in flatness(s, total) {
            pass &= ok;
            table.push_str(&format!(
                "| node{} | {name} | {b:.1} | {l:.1} | {pct:+.2} | {} |\n",
                i + 1,
                if ok { "yes" } else { "NO" }
            ));
            flat_json.push(json!({"node": i + 1, "series": name, "baseline": b, "last": l, "change_pct": pct, "flat": ok}));
        }
    }
    println!("{table}");
    println!(
        "windows: {how}; short connections: {ok} ok, {failed} failed ({:.0}/s); long connections broken: {long_failed}",
        ok / total
    );
    let dir = crate::target_dir()?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let samples = |s: &[Sample]| -> Vec<Value> {
        s.iter()
            .map(|x| {
                json!({"secs": x.secs, "fds": x.fds, "rss_mib": x.rss, "anon_mib": x.anon,
                    "heap_in_use_mib": x.heap_in_use, "heap_free_mib": x.heap_free})
            })
            .collect()
    };
    let doc = json!({
        "command": format!("cargo xtask soak {}", args.join(" ")),
        "when": super::now_utc(),
        "machine": super::machine(),
        "load_before": load_before,
        "load_after": load_after,
        "minutes": total / 60.0,
        "windows": how,
        "pass": pass,
        "short_connections": {"ok": ok, "failed": failed, "per_sec": ok / total, "runs": churn_results},
        "long_connections": long_results,
        "flatness": flat_json,
        "samples": {"node1": samples(&series[0]), "node2": samples(&series[1])},
    });
    let json_path = dir.join("soak.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&doc)?)?;
    let svg = dir.join("soak.svg");
    chart(&svg, &series, total)?;
    println!("JSON: {}\nchart: {}", json_path.display(), svg.display());
    println!("soak: {}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// Four panels over time (descriptors, RSS, anonymous memory, the allocator's heap in use and
/// free), one line per daemon (dashed: heap free), with the two compared windows shaded.
fn chart(path: &Path, series: &[Vec<Sample>; 2], total: f64) -> Result<()> {
    let colours = [RGBColor(50, 110, 200), RGBColor(214, 90, 60)];
    let (base, last, how) = windows(total);
    type Lines = &'static [(Field, &'static str)];
    let panels: [(&str, &str, Lines); 4] = [
        ("Open descriptors", "fds", &[(|x| x.fds, "")]),
        ("RSS", "MiB", &[(|x| x.rss, "")]),
        ("Anonymous resident memory", "MiB", &[(|x| x.anon, "")]),
        (
            "Heap in use (solid) and free (dashed)",
            "MiB",
            &[(|x| x.heap_in_use, ""), (|x| x.heap_free, " free")],
        ),
    ];
    let root = SVGBackend::new(path, (1680, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(
            &format!(
                "Soak: both daemons over {:.0} minutes (shaded: {how})",
                total / 60.0
            ),
            ("sans-serif", 17),
        )
        .map_err(plot_err)?;
    let minutes = total / 60.0;
    for (area, (title, unit, lines)) in root.split_evenly((1, 4)).iter().zip(panels) {
        let max = lines
            .iter()
            .flat_map(|(f, _)| series.iter().flatten().map(f))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let top = if max > 0.0 { max * 1.25 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..minutes, 0.0..top)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(unit)
            .draw()
            .map_err(plot_err)?;
        for (from, to) in [base, last] {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(from / 60.0, 0.0), (to / 60.0, top)],
                    RGBColor(0, 0, 0).mix(0.06).filled(),
                )))
                .map_err(plot_err)?;
        }
        for (f, suffix) in lines {
            for (i, s) in series.iter().enumerate() {
                let c = colours[i];
                let points = s
                    .iter()
                    .map(|x| (x.secs / 60.0, f(x)))
                    .filter(|p| p.1.is_finite());
                let label = format!("node{} daemon{suffix}", i + 1);
                if suffix.is_empty() {
                    chart
                        .draw_series(LineSeries::new(points, c.stroke_width(2)))
                        .map_err(plot_err)?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                        });
                } else {
                    chart
                        .draw_series(DashedLineSeries::new(points, 6, 4, c.stroke_width(2)))
                        .map_err(plot_err)?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(1))
                        });
                }
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(secs: f64, v: f64) -> Sample {
        Sample {
            secs,
            fds: v,
            rss: v,
            anon: v,
            heap_in_use: v,
            heap_free: f64::NAN,
        }
    }

    #[test]
    fn short_runs_compare_thirds_and_long_runs_minutes_5_to_10() {
        assert_eq!(windows(900.0).0, (300.0, 600.0));
        assert_eq!(windows(900.0).1, (600.0, 900.0));
        assert_eq!(windows(1800.0).0, (300.0, 600.0));
        assert_eq!(windows(1800.0).1, (1200.0, 1800.0));
    }

    #[test]
    fn growth_beyond_five_percent_is_not_flat() {
        let steady: Vec<Sample> = (0..90).map(|i| flat(i as f64 * 10.0, 100.0)).collect();
        assert!(flatness(&steady, 900.0).iter().all(|f| f.4));
        let growing: Vec<Sample> = (0..90)
            .map(|i| flat(i as f64 * 10.0, 100.0 + i as f64))
            .collect();
        let v = flatness(&growing, 900.0);
        // Every series grows by 30 between the windows: beyond 5% and the descriptor slack.
        assert!(v.iter().all(|f| !f.4), "{v:?}");
    }

    #[test]
    fn chart_renders_svg() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("soak.svg");
        let s: Vec<Sample> = (0..30).map(|i| flat(i as f64 * 10.0, 50.0)).collect();
        chart(&path, &[s.clone(), s], 300.0).expect("chart");
        let svg = std::fs::read_to_string(&path).expect("read svg");
        assert!(svg.contains("Open descriptors") && svg.contains("node2 daemon"));
        assert!(svg.contains("Heap in use"));
    }
}
