//! The capture `ip rule` and local route of each address family, set up and removed by
//! running `ip` (iproute2): a few commands at start and stop, not worth a netlink stack.

use std::process::Command;

use super::RULE_PRIORITY;
use crate::capture::CaptureError;

/// Runs `ip <args>`. `Ok(false)` when it failed with a message containing one of `benign`.
fn ip(args: &[String], benign: &[&str]) -> Result<bool, CaptureError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CaptureError::Command {
            command: command.clone(),
            detail: format!("cannot run `ip` ({e}); install iproute2"),
        })?;
    if output.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if benign.iter().any(|b| stderr.contains(b)) {
        return Ok(false);
    }
    Err(CaptureError::Command {
        command,
        detail: format!("{}: {stderr}", output.status),
    })
}

fn rule_args(family: &str, verb: &str, mark: u32, table: u32) -> Vec<String> {
    vec![
        family.into(),
        "rule".into(),
        verb.into(),
        "pref".into(),
        RULE_PRIORITY.to_string(),
        "fwmark".into(),
        format!("{mark:#x}/{mark:#x}"),
        "lookup".into(),
        table.to_string(),
    ]
}

fn route_args(family: &str, verb: &str, table: u32) -> Vec<String> {
    [
        family, "route", verb, "local", "default", "dev", "lo", "table",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([table.to_string()])
    .collect()
}

/// The address families to route captured packets of: IPv4, and IPv6 when the node has it
/// (`ip -6` rule and `local default dev lo` route in the same table).
fn families() -> Vec<&'static str> {
    let mut f = vec!["-4"];
    if crate::socket::host_has_ipv6() {
        f.push("-6");
    }
    f
}

/// Installs the capture rule and local route of every family; both may already exist (a
/// previous instance that crashed), which is fine.
pub(crate) fn install(mark: u32, table: u32) -> Result<(), CaptureError> {
    for family in families() {
        ip(&route_args(family, "replace", table), &[])?;
        let added = ip(&rule_args(family, "add", mark, table), &["File exists"])?;
        tracing::info!(
            family,
            mark = format!("{mark:#x}"),
            table,
            priority = RULE_PRIORITY,
            already_present = !added,
            "capture routing installed"
        );
    }
    Ok(())
}

/// Removes the capture rules (every copy) and local routes of every family; absent ones are
/// fine.
pub(crate) fn remove(mark: u32, table: u32) -> Result<(), CaptureError> {
    for family in families() {
        remove_family(family, mark, table)?;
    }
    Ok(())
}

fn remove_family(family: &str, mark: u32, table: u32) -> Result<(), CaptureError> {
    let gone = [
        "No such file or directory",
        "No such process",
        "Cannot find",
        // The capture table was never filled (capture was off), or is already gone.
        "FIB table does not exist",
    ];
    let mut result = Ok(());
    for _ in 0..16 {
        match ip(&rule_args(family, "del", mark, table), &gone) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let route = ip(&route_args(family, "del", table), &gone);
    result?;
    route?;
    tracing::info!(
        family,
        mark = format!("{mark:#x}"),
        table,
        "capture routing removed"
    );
    Ok(())
}
