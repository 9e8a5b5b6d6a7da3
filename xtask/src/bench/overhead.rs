//! `cargo xtask overhead [--pods N]`: "how much do I save over sidecars?" on this machine.
//!
//! N client pods on node 1 each talk to their own server pod on node 2 (so N pods per node),
//! every client offering the same fixed-rate request/response load. The same pods and load are
//! measured with no data plane (direct, the latency baseline), with one Envoy sidecar per pod
//! (2N Envoys) and in ambient mode (one daemon per node). Reported: total data-plane memory
//! (PSS, RssAnon, RSS) idle and under load, CPU used during the load, and added latency
//! p50/p99; as a terminal table, a JSON file and an SVG chart.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use mesh_tests::cluster::{Cluster, ClusterSpec, Pod, PodSpec};
use plotters::prelude::*;
use serde_json::{json, Value};

use super::{probe, sidecar, Mode, ECHO_PORT, SIDECAR_ECHO};

#[derive(Debug)]
struct Opts {
    pods: usize,
    secs: f64,
    rate: f64,
    out: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        pods: 10,
        secs: 10.0,
        rate: 200.0,
        out: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<String> {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        let num = |name: &str, v: String| -> Result<f64> {
            v.parse().with_context(|| format!("{name} `{v}`"))
        };
        match a.as_str() {
            "--pods" => o.pods = num("--pods", val("--pods")?)?.clamp(1.0, 100.0) as usize,
            "--secs" => o.secs = num("--secs", val("--secs")?)?.max(2.0),
            "--rate" => o.rate = num("--rate", val("--rate")?)?.max(1.0),
            "--out" => o.out = Some(PathBuf::from(val("--out")?)),
            other => {
                bail!("unknown argument `{other}` (flags: --pods N --secs S --rate R --out DIR)")
            }
        }
    }
    Ok(o)
}

/// One mode's figures.
#[derive(Debug, Default, Clone)]
struct Figures {
    procs: usize,
    idle: probe::Mem,
    load: probe::Mem,
    cpu_s: f64,
    requests: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `cargo xtask overhead [--pods N] [--secs S] [--rate R] [--out DIR]`.
pub fn run(args: &[String]) -> Result<bool> {
    let o = parse(args)?;
    let envoy = super::prepare(false)?;
    let load_before = super::uptime();
    let mut spec = ClusterSpec::new(2).namespace("bench", true);
    for i in 0..o.pods {
        spec = spec
            .pod(PodSpec::new(&format!("bench/c{i}"), 1).sa(&format!("c{i}")))
            .pod(PodSpec::new(&format!("bench/s{i}"), 2).sa(&format!("s{i}")));
    }
    let mut cluster = Cluster::start(spec)?;
    let pairs: Vec<(Pod, Pod)> = (0..o.pods)
        .map(|i| {
            (
                cluster.pod(&format!("bench/c{i}")).clone(),
                cluster.pod(&format!("bench/s{i}")).clone(),
            )
        })
        .collect();
    let _servers = pairs
        .iter()
        .flat_map(|(_, s)| {
            [Mode::Direct, Mode::Ambient, Mode::Envoy]
                .map(|m| s.serve(ECHO_PORT + m.port_offset(), &s.name))
        })
        .collect::<Result<Vec<_>>>()?;
    let peers = pairs.clone();
    let routes = move |p: &Pod| -> Vec<sidecar::Route> {
        peers
            .iter()
            .filter(|(c, _)| c.key() == p.key())
            .map(|(_, s)| sidecar::Route {
                local_port: SIDECAR_ECHO,
                target: SocketAddrV4::new(s.ip, ECHO_PORT + Mode::Envoy.port_offset()),
                identity: s.identity(),
            })
            .collect()
    };

    let mut figs: Vec<(Mode, Figures)> = Vec::new();
    for mode in [Mode::Direct, Mode::Envoy, Mode::Ambient] {
        eprintln!("overhead: {} with {} pods per node", mode.name(), o.pods);
        let dp = super::bring_up(&mut cluster, &envoy, mode, &pairs, &routes, &[])?;
        let f = measure(&o, mode, &dp.pids, &pairs);
        drop(dp);
        super::bring_down(&cluster, mode)?;
        figs.push((mode, f.with_context(|| format!("{} mode", mode.name()))?));
    }
    let load_after = super::uptime();
    let out = match &o.out {
        Some(d) => d.clone(),
        None => crate::target_dir()?.join("bench"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let doc = to_json(&o, &figs, &load_before, &load_after);
    let json_path = out.join("overhead.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&doc)?)?;
    let svg_path = out.join("overhead.svg");
    chart(&svg_path, &o, &figs)?;
    println!("{}", table(&o, &figs));
    println!("load before: {load_before}\nload after:  {load_after}");
    println!(
        "JSON: {}\nchart: {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(true)
}

fn measure(o: &Opts, mode: Mode, pids: &[u32], pairs: &[(Pod, Pod)]) -> Result<Figures> {
    std::thread::sleep(Duration::from_secs(2));
    let mut f = Figures {
        procs: pids.len(),
        idle: probe::mem_total(pids)?,
        ..Figures::default()
    };
    let cpu0 = probe::cpu_total(pids)?;
    let children = pairs
        .iter()
        .map(|(c, s)| {
            let to = match mode {
                Mode::Envoy => format!("127.0.0.1:{SIDECAR_ECHO}"),
                _ => format!("{}:{}", s.ip, ECHO_PORT + mode.port_offset()),
            };
            probe::meshload_spawn(c, &probe::rr_args(&to, 64, o.secs, Some(o.rate)))
        })
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_secs_f64(o.secs / 2.0));
    f.load = probe::mem_total(pids)?;
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for child in children {
        let v = probe::meshload_result(child)?;
        let get = |k: &str| v[k].as_f64().with_context(|| format!("meshload lacks {k}"));
        p50.push(get("p50_us")?);
        p99.push(get("p99_us")?);
        f.requests += get("requests")?;
    }
    f.cpu_s = probe::cpu_total(pids)? - cpu0;
    f.p50_us = probe::median(&p50);
    f.p99_us = probe::median(&p99);
    Ok(f)
}

fn get(figs: &[(Mode, Figures)], m: Mode) -> Figures {
    figs.iter()
        .find(|(x, _)| *x == m)
        .map(|(_, f)| f.clone())
        .unwrap_or_default()
}

fn table(o: &Opts, figs: &[(Mode, Figures)]) -> String {
    let d = get(figs, Mode::Direct);
    let mut t = format!(
        "\n{} pods per node, 2 nodes; each of {} clients at {} req/s of 64 B for {} s\n\n\
         | mode | data-plane processes | idle PSS MiB | idle RssAnon MiB | idle RSS MiB | load PSS MiB | CPU s | CPU ms / 1k req | p50 us | p99 us | added p50 us | added p99 us |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        o.pods, o.pods, o.rate, o.secs
    );
    for (m, f) in figs {
        t.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.0} | {:.0} | {:+.0} | {:+.0} |\n",
            m.name(),
            f.procs,
            f.idle.pss,
            f.idle.anon,
            f.idle.rss,
            f.load.pss,
            f.cpu_s,
            f.cpu_s / f.requests.max(1.0) * 1e6,
            f.p50_us,
            f.p99_us,
            f.p50_us - d.p50_us,
            f.p99_us - d.p99_us,
        ));
    }
    let (a, e) = (get(figs, Mode::Ambient), get(figs, Mode::Envoy));
    let share = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    t.push_str(&format!(
        "\nambient / sidecars: idle PSS {:.3}, load PSS {:.3}, idle RssAnon {:.3}, CPU {:.3} \
         (target: memory <= 0.100: {})\n",
        share(a.idle.pss, e.idle.pss),
        share(a.load.pss, e.load.pss),
        share(a.idle.anon, e.idle.anon),
        share(a.cpu_s, e.cpu_s),
        if share(a.load.pss, e.load.pss) <= 0.1 && share(a.idle.pss, e.idle.pss) <= 0.1 {
            "met"
        } else {
            "MISSED"
        }
    ));
    t
}

fn to_json(o: &Opts, figs: &[(Mode, Figures)], before: &str, after: &str) -> Value {
    let d = get(figs, Mode::Direct);
    let modes: serde_json::Map<String, Value> = figs
        .iter()
        .map(|(m, f)| {
            let mem = |x: &probe::Mem| json!({"rss_mib": x.rss, "rss_anon_mib": x.anon, "pss_mib": x.pss});
            (
                m.name().to_string(),
                json!({
                    "processes": f.procs,
                    "idle": mem(&f.idle),
                    "load": mem(&f.load),
                    "cpu_s": f.cpu_s,
                    "requests": f.requests,
                    "cpu_ms_per_1k_requests": f.cpu_s / f.requests.max(1.0) * 1e6,
                    "p50_us": f.p50_us,
                    "p99_us": f.p99_us,
                    "added_p50_us": f.p50_us - d.p50_us,
                    "added_p99_us": f.p99_us - d.p99_us,
                }),
            )
        })
        .collect();
    json!({
        "date": super::now_utc(),
        "machine": super::machine(),
        "load_before": before,
        "load_after": after,
        "pods_per_node": o.pods,
        "nodes": 2,
        "rate_per_client": o.rate,
        "request_bytes": 64,
        "secs": o.secs,
        "modes": modes,
    })
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

/// One bar of a chart panel: label, value, colour.
type Bar<'a> = (&'a str, f64, RGBColor);

/// Three panels (memory, CPU, added latency), Envoy sidecars vs ambient.
fn chart(path: &Path, o: &Opts, figs: &[(Mode, Figures)]) -> Result<()> {
    let (a, e, d) = (
        get(figs, Mode::Ambient),
        get(figs, Mode::Envoy),
        get(figs, Mode::Direct),
    );
    let red = RGBColor(214, 90, 60);
    let blue = RGBColor(50, 110, 200);
    let per_k = |f: &Figures| f.cpu_s / f.requests.max(1.0) * 1e6;
    let panels: Vec<(&str, &str, Vec<Bar>)> = vec![
        (
            "Data-plane memory (total PSS)",
            "MiB",
            vec![
                ("sidecars idle", e.idle.pss, red),
                ("ambient idle", a.idle.pss, blue),
                ("sidecars load", e.load.pss, red),
                ("ambient load", a.load.pss, blue),
            ],
        ),
        (
            "Data-plane CPU",
            "ms per 1,000 requests",
            vec![("sidecars", per_k(&e), red), ("ambient", per_k(&a), blue)],
        ),
        (
            "Added latency over direct",
            "microseconds",
            vec![
                ("sidecars p50", e.p50_us - d.p50_us, red),
                ("ambient p50", a.p50_us - d.p50_us, blue),
                ("sidecars p99", e.p99_us - d.p99_us, red),
                ("ambient p99", a.p99_us - d.p99_us, blue),
            ],
        ),
    ];
    let root = SVGBackend::new(path, (1260, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root
        .titled(
            &format!(
                "Sidecars (one Envoy per pod) vs ambient (one daemon per node): {} pods per node, {} x {} req/s",
                o.pods, o.pods, o.rate
            ),
            ("sans-serif", 18),
        )
        .map_err(plot_err)?;
    for (area, (title, unit, bars)) in root.split_evenly((1, 3)).iter().zip(panels) {
        let max = bars.iter().map(|b| b.1).fold(0.0, f64::max);
        let min = bars.iter().map(|b| b.1).fold(0.0, f64::min);
        let top = if max > 0.0 { max * 1.2 } else { 1.0 };
        let n = bars.len();
        let labels: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d((0..n).into_segmented(), (min * 1.2)..top)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(unit)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v, c))| {
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    c.filled(),
                );
                r.set_margin(0, 0, 10, 10);
                r
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
                Text::new(
                    format!("{v:.1}"),
                    (SegmentValue::CenterOf(i), v.max(0.0) + top * 0.02),
                    ("sans-serif", 12),
                )
            }))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_renders_svg_with_all_panels() {
        let dir = tempfile_dir();
        let path = dir.join("o.svg");
        let f = |pss: f64, p50: f64| Figures {
            procs: 2,
            idle: probe::Mem {
                rss: pss,
                anon: pss / 2.0,
                pss,
            },
            load: probe::Mem {
                rss: pss,
                anon: pss,
                pss: pss * 1.1,
            },
            cpu_s: 1.0,
            requests: 1000.0,
            p50_us: p50,
            p99_us: p50 * 2.0,
        };
        let figs = vec![
            (Mode::Direct, f(0.0, 30.0)),
            (Mode::Envoy, f(300.0, 120.0)),
            (Mode::Ambient, f(12.0, 50.0)),
        ];
        let o = Opts {
            pods: 10,
            secs: 1.0,
            rate: 100.0,
            out: None,
        };
        chart(&path, &o, &figs).expect("chart");
        let svg = std::fs::read_to_string(&path).expect("svg written");
        for s in ["<svg", "Data-plane memory", "Added latency", "ambient p99"] {
            assert!(svg.contains(s), "missing {s}");
        }
        assert!(table(&o, &figs).contains("| ambient | 2 |"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("tmp dir");
        d
    }
}
