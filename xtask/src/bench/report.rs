//! The `bench` report: a Markdown table of the medians per path with their ratios, the added
//! latency over `direct`, the performance targets, and the JSON document of every sample.

use serde_json::{json, Value};

use super::{machine, now_utc, probe, Mode, Opts, Samples};

pub(super) struct Report {
    pub table: String,
    pub json: Value,
}

/// A run's performance targets, each a measured value against its target with a verdict:
/// printed under the run's table and kept in its JSON (`cargo xtask bench` and `bench
/// waypoint`).
#[derive(Default)]
pub(super) struct Targets(Vec<Value>);

impl Targets {
    /// Records `value` against `target` (met when `ok`); nothing when it was not measured.
    pub fn check(
        &mut self,
        name: &str,
        value: Option<f64>,
        ok: impl Fn(f64) -> bool,
        target: &str,
    ) {
        if let Some(v) = value {
            let verdict = if ok(v) { "met" } else { "MISSED" };
            self.0
                .push(json!({"check": name, "value": v, "target": target, "verdict": verdict}));
        }
    }

    /// The `targets:` list, its columns as wide as their longest entry.
    pub fn text(&self) -> String {
        let text = |c: &Value, k: &str| c[k].as_str().unwrap_or_default().to_string();
        let width = |k: &str| self.0.iter().map(|c| text(c, k).len()).max().unwrap_or(0);
        let (name_w, target_w) = (width("check"), width("target"));
        let mut t = String::from("\ntargets:\n");
        for c in &self.0 {
            t.push_str(&format!(
                "  {:<name_w$} {:>10.3}  target {:<target_w$} {}\n",
                text(c, "check"),
                c["value"].as_f64().unwrap_or(f64::NAN),
                text(c, "target"),
                text(c, "verdict"),
            ));
        }
        t
    }

    /// The targets for the run's JSON document.
    pub fn json(&self) -> Value {
        Value::Array(self.0.clone())
    }
}

pub(super) fn report(o: &Opts, s: &Samples, before: &str, after: &str) -> Report {
    let mut metrics: Vec<&String> = s.keys().map(|(_, m)| m).collect();
    metrics.sort();
    metrics.dedup();
    let med = |mode: Mode, m: &str| s.get(&(mode, m.to_string())).map(|v| probe::median(v));
    let cell = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    // The istio and relay paths have columns only when they were measured
    // (`ISTIO_ZTUNNEL_BIN`, `--relay`).
    let measured = |m: Mode| s.keys().any(|(mode, _)| *mode == m);
    let (istio, relay) = (measured(Mode::Istio), measured(Mode::Relay));
    let modes: Vec<Mode> = [
        Mode::Direct,
        Mode::Ambient,
        Mode::Envoy,
        Mode::Istio,
        Mode::Relay,
    ]
    .into_iter()
    .filter(|&m| m <= Mode::Envoy || measured(m))
    .collect();
    // Ratios of one path to another beyond those to `direct`: the aims against Istio's
    // ztunnel, and how far each mesh data plane is above the floor of a plain relay.
    let mut pairs = Vec::new();
    if istio {
        pairs.push((Mode::Ambient, Mode::Istio));
    }
    if relay {
        pairs.push((Mode::Ambient, Mode::Relay));
        if istio {
            pairs.push((Mode::Istio, Mode::Relay));
        }
    }
    let mut head = format!("| metric (median of {} runs) |", o.runs);
    for mode in &modes {
        head.push_str(&format!(" {} |", mode.name()));
    }
    for mode in &modes[1..] {
        head.push_str(&format!(" {}/direct |", mode.name()));
    }
    for (a, b) in &pairs {
        head.push_str(&format!(" {}/{} |", a.name(), b.name()));
    }
    let cols = head.matches('|').count() - 1;
    let mut t = format!("\n{head}\n|{}\n", "---|".repeat(cols));
    let mut jm = serde_json::Map::new();
    for m in &metrics {
        let d = med(Mode::Direct, m);
        let mut row = format!("| {m} |");
        for &mode in &modes {
            row.push_str(&format!(" {} |", cell(med(mode, m))));
        }
        for &mode in &modes[1..] {
            row.push_str(&format!(" {} |", ratio(med(mode, m), d)));
        }
        for &(a, b) in &pairs {
            row.push_str(&format!(" {} |", ratio(med(a, m), med(b, m))));
        }
        t.push_str(&row);
        t.push('\n');
        let samples = |mode: Mode| s.get(&(mode, m.to_string())).cloned().unwrap_or_default();
        let mut entry = serde_json::Map::new();
        let mut all = serde_json::Map::new();
        for &mode in &modes {
            entry.insert(mode.name().into(), json!(med(mode, m)));
            all.insert(mode.name().into(), json!(samples(mode)));
        }
        entry.insert("samples".into(), Value::Object(all));
        jm.insert(m.to_string(), Value::Object(entry));
    }
    // Added latency and the performance targets.
    let added = |mode: Mode, m: &str| match (med(mode, m), med(Mode::Direct, m)) {
        (Some(x), Some(d)) => Some(x - d),
        _ => None,
    };
    let mut targets = Targets::default();
    for &mode in &modes[1..] {
        let bad = |m: &str| s.get(&(mode, m.to_string())).map(|v| v.iter().sum::<f64>());
        for (what, failed, lost) in [
            ("held connections", "conns_failed", "conns_lost"),
            ("stalled flows", "stalled_failed", "stalled_lost"),
        ] {
            if let (Some(f), Some(l)) = (bad(failed), bad(lost)) {
                targets.check(
                    &format!("{} {what} failed or lost, all rounds", mode.name()),
                    Some(f + l),
                    |v| v == 0.0,
                    "0",
                );
            }
        }
    }
    let tput = |mode| ratio_f(med(mode, "tput_1_gbps"), med(Mode::Direct, "tput_1_gbps"));
    targets.check(
        "ambient single-stream throughput / direct",
        tput(Mode::Ambient),
        |v| v >= 0.34,
        ">= 0.34",
    );
    targets.check(
        "ambient single-stream throughput / envoy",
        ratio_f(
            med(Mode::Ambient, "tput_1_gbps"),
            med(Mode::Envoy, "tput_1_gbps"),
        ),
        |v| v > 1.0,
        "> 1",
    );
    let a64 = added(Mode::Ambient, "rr64_p50_us");
    let e64 = added(Mode::Envoy, "rr64_p50_us");
    targets.check(
        "ambient added p50, 64 B back-to-back (us)",
        a64,
        |v| v <= 26.0,
        "<= 26",
    );
    if let (Some(a), Some(e)) = (a64, e64) {
        targets.check(
            "ambient added p50 - envoy added p50 (us)",
            Some(a - e),
            |v| v < 0.0,
            "< 0",
        );
    }
    targets.check(
        "ambient idle RSS per daemon (MiB)",
        med(Mode::Ambient, "mem_idle_rss_mb"),
        |v| v <= 9.0 * 1000.0 * 1000.0 / 1024.0 / 1024.0,
        "<= 9 MB (8.58 MiB)",
    );
    t.push_str("\nadded p50/p99 latency over direct (us):\n");
    for tag in [
        "rr64",
        "rr64_fixed",
        "rr1024",
        "rr1024_fixed",
        "loaded_rr64",
    ] {
        let f = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        t.push_str(&format!("  {tag:<13}"));
        for &mode in &modes[1..] {
            t.push_str(&format!(
                " {} p50 +{} p99 +{}  ",
                mode.name(),
                f(added(mode, &format!("{tag}_p50_us"))),
                f(added(mode, &format!("{tag}_p99_us"))),
            ));
        }
        t.truncate(t.trim_end().len());
        t.push('\n');
    }
    t.push_str(&targets.text());
    t.push_str(&format!("\nload before: {before}\nload after:  {after}\n"));
    let json = json!({
        "date": now_utc(),
        "machine": machine(),
        "load_before": before,
        "load_after": after,
        "runs": o.runs,
        "secs": o.secs,
        "fixed_rate_per_s": o.rate,
        "scenarios": o.scenarios,
        "metrics": jm,
        "targets": targets.json(),
    });
    Report { table: t, json }
}

fn ratio_f(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_measured_values_with_their_verdicts() {
        let mut t = Targets::default();
        t.check("ratio", Some(1.2), |v| v > 1.0, "> 1");
        t.check("added p50 (us)", Some(30.0), |v| v <= 26.0, "<= 26");
        t.check("not measured", None, |_| true, "any");
        let json = t.json();
        assert_eq!(json.as_array().map(Vec::len), Some(2));
        assert_eq!(json[1]["verdict"], "MISSED");
        assert_eq!(
            t.text(),
            "\ntargets:\n  ratio               1.200  target > 1   met\n  added p50 (us)     30.000  target <= 26 MISSED\n"
        );
    }
}
