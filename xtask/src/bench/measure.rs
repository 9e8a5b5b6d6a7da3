//! One round of one path: [`measure`] runs the selected scenarios (throughput, latency, sched,
//! connrate, loaded, and through [`super::held`] conns and stalled) and adds their samples.

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::cluster::Pod;
use serde_json::Value;

use super::held::{held_connections, Hold};
use super::{
    probe, push, sched, Dataplane, Mode, Opts, Samples, ECHO_PORT, IPERF_PORT, SIDECAR_ECHO,
    SIDECAR_IPERF,
};

/// Runs the selected scenarios once for `mode`, adding samples.
pub(super) fn measure(
    o: &Opts,
    mode: Mode,
    dp: &Dataplane,
    client: &Pod,
    server: &Pod,
    s: &mut Samples,
) -> Result<()> {
    let (host, iperf_port, echo) = match mode {
        Mode::Envoy => (
            "127.0.0.1".to_string(),
            SIDECAR_IPERF,
            format!("127.0.0.1:{SIDECAR_ECHO}"),
        ),
        Mode::Relay => {
            let off = mode.port_offset();
            let at = super::relay::CLIENT_SIDE;
            (
                at.to_string(),
                IPERF_PORT + off,
                format!("{at}:{}", ECHO_PORT + off),
            )
        }
        _ => (
            server.ip.to_string(),
            IPERF_PORT + mode.port_offset(),
            format!("{}:{}", server.ip, ECHO_PORT + mode.port_offset()),
        ),
    };
    let per_proc = |m: probe::Mem| {
        let n = dp.pids.len().max(1) as f64;
        (m.rss / n, m.anon / n, m.pss / n)
    };
    let has_dp = !dp.pids.is_empty();
    if has_dp {
        std::thread::sleep(Duration::from_secs(1));
        let (rss, anon, pss) = per_proc(probe::mem_total(&dp.pids)?);
        push(s, mode, "mem_idle_rss_mb", rss);
        push(s, mode, "mem_idle_anon_mb", anon);
        push(s, mode, "mem_idle_pss_mb", pss);
    }
    let want = |name: &str| o.scenarios.iter().any(|x| x == name);
    if want("throughput") {
        for streams in [1u32, 4] {
            let t = probe::retry_busy(|| transfer(o, dp, client, &host, iperf_port, streams))?;
            push(s, mode, &format!("tput_{streams}_gbps"), t.bps / 1e9);
            // The whole machine: a CPU-bound path leaves little idle; one that waits (on
            // TCP transmission, wake-ups) leaves more (docs/BENCHMARKS.md, "Keeping the
            // daemons awake").
            push(
                s,
                mode,
                &format!("sys_idle_pct_{streams}"),
                t.sys_after.idle_pct_since(&t.sys_before),
            );
            push(
                s,
                mode,
                &format!("ctxt_per_s_{streams}"),
                t.sys_after.switches_since(&t.sys_before) / t.secs,
            );
            if has_dp {
                push(
                    s,
                    mode,
                    &format!("cpu_s_per_gb_{streams}"),
                    t.cpu / (t.bytes / 1e9),
                );
                if streams == 4 {
                    let (rss, anon, pss) = per_proc(t.load_mem);
                    push(s, mode, "mem_load_rss_mb", rss);
                    push(s, mode, "mem_load_anon_mb", anon);
                    push(s, mode, "mem_load_pss_mb", pss);
                }
            }
        }
    }
    if want("latency") {
        for size in [64usize, 1024] {
            for rate in [None, Some(o.rate)] {
                let tag = match rate {
                    None => format!("rr{size}"),
                    Some(_) => format!("rr{size}_fixed"),
                };
                let cpu0 = probe::cpu_total(&dp.pids)?;
                let child =
                    probe::meshload_spawn(client, &probe::rr_args(&echo, size, o.secs, rate))?;
                let v = probe::meshload_result(child)?;
                let cpu = probe::cpu_total(&dp.pids)? - cpu0;
                for p in ["p50", "p90", "p99"] {
                    push(
                        s,
                        mode,
                        &format!("{tag}_{p}_us"),
                        num(&v, &format!("{p}_us"))?,
                    );
                }
                if rate.is_none() {
                    push(s, mode, &format!("{tag}_rps"), num(&v, "rps")?);
                    if has_dp {
                        let req = num(&v, "requests")?.max(1.0);
                        push(
                            s,
                            mode,
                            &format!("cpu_s_per_1k_req_{size}"),
                            cpu / req * 1e3,
                        );
                    }
                }
            }
        }
    }
    if want("sched") {
        let data = crate::target_dir()?
            .join("bench")
            .join(format!("sched-{}.data", mode.name()));
        for (k, v) in sched::hops(client, &echo, o.secs.min(3.0), o.rate, &dp.pids, &data)? {
            push(s, mode, &k, v);
        }
    }
    if want("connrate") {
        // First new connections at a fixed 200/s, each timed to the server's first line: what
        // one new flow waits for its path (capture, tunnel, policy) on an otherwise idle path.
        // Before the back-to-back run, whose thousands of closed connections leave TIME_WAIT
        // sockets behind in whichever namespace connects to the server (the client pod, the
        // server node for ambient, the server's sidecar), so that every later connect()
        // searches the local ports for a free one: milliseconds per connection.
        let args = probe::crr_args(&echo, o.secs, Some(200.0));
        let v = probe::meshload_result(probe::meshload_spawn(client, &args)?)?;
        for p in ["p50", "p99"] {
            push(
                s,
                mode,
                &format!("conn_setup_{p}_us"),
                num(&v, &format!("{p}_us"))?,
            );
        }
        let failed = num(&v, "failed")?;
        let args = probe::crr_args(&echo, o.secs, None);
        let v = probe::meshload_result(probe::meshload_spawn(client, &args)?)?;
        push(s, mode, "conn_per_s", num(&v, "cps")?);
        push(s, mode, "conn_failed", failed + num(&v, "failed")?);
    }
    if want("loaded") {
        // 64 B requests back to back while one bulk stream runs between the same two pods:
        // what an RPC sees when a transfer shares its path, and in ambient its pooled HBONE
        // connection. Back to back, because at a fixed rate one slow round trip delays every
        // request scheduled after it and the percentiles measure the backlog instead.
        let (v, bps) = probe::retry_busy(|| {
            let bulk = probe::iperf_spawn(client, &host, iperf_port, 1, o.secs + 2.0)?;
            std::thread::sleep(Duration::from_secs(1));
            let rr = probe::rr_args(&echo, 64, o.secs, None);
            let v = probe::meshload_result(probe::meshload_spawn(client, &rr)?)?;
            Ok((v, probe::iperf_result(bulk)?.0))
        })?;
        for p in ["p50", "p90", "p99"] {
            push(
                s,
                mode,
                &format!("loaded_rr64_{p}_us"),
                num(&v, &format!("{p}_us"))?,
            );
        }
        push(s, mode, "loaded_tput_gbps", bps / 1e9);
    }
    if want("conns") && has_dp {
        let mut holders = vec![(client, echo.clone())];
        if mode == Mode::Ambient {
            let back = format!("{}:{}", client.ip, ECHO_PORT + mode.port_offset());
            holders.push((server, back));
        }
        held_connections(o, mode, dp, &holders, Hold::Idle(o.conns), s)?;
    }
    if want("stalled") && has_dp {
        held_connections(o, mode, dp, &[(client, echo)], Hold::Stalled, s)?;
    }
    Ok(())
}

/// One iperf3 transfer with what was measured around it.
struct Transfer {
    bps: f64,
    bytes: f64,
    /// Data-plane CPU seconds during the transfer.
    cpu: f64,
    /// Data-plane memory half-way through.
    load_mem: probe::Mem,
    sys_before: probe::SystemCpu,
    sys_after: probe::SystemCpu,
    secs: f64,
}

fn transfer(
    o: &Opts,
    dp: &Dataplane,
    client: &Pod,
    host: &str,
    port: u16,
    streams: u32,
) -> Result<Transfer> {
    let cpu0 = probe::cpu_total(&dp.pids)?;
    let (sys_before, t0) = (probe::system_cpu()?, std::time::Instant::now());
    let child = probe::iperf_spawn(client, host, port, streams, o.secs)?;
    std::thread::sleep(Duration::from_secs_f64(o.secs / 2.0));
    let load_mem = probe::mem_total(&dp.pids)?;
    let (bps, bytes) = probe::iperf_result(child)?;
    Ok(Transfer {
        bps,
        bytes,
        cpu: probe::cpu_total(&dp.pids)? - cpu0,
        load_mem,
        sys_before,
        sys_after: probe::system_cpu()?,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// The number `key` of a meshload JSON report.
pub(super) fn num(v: &Value, key: &str) -> Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("meshload report lacks `{key}`: {v}"))
}
