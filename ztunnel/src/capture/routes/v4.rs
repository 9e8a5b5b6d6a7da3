//! The IPv4 main table, from `/proc/thread-self/net/route`.
//!
//! One line per route after a header: `Iface Destination Gateway Flags RefCnt Use Metric Mask
//! MTU Window IRTT`, addresses as the hex of the in-memory (network order) u32, the metric in
//! decimal. Only the main table is listed.

use std::net::Ipv4Addr;

use super::Route;

/// The calling thread's IPv4 main table.
pub(super) const ROUTE_FILE: &str = "/proc/thread-self/net/route";
const RTF_GATEWAY: u32 = 0x2;

/// An address as `/proc/net/route` prints it.
fn parse_hex_addr(s: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(s, 16).ok()?;
    Some(Ipv4Addr::from(v.to_ne_bytes()))
}

/// Parses the `/proc/net/route` format; malformed lines are skipped.
pub(super) fn parse(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            let mask = u32::from(parse_hex_addr(f[7])?);
            Some(Route {
                iface: f[0].to_string(),
                dest: parse_hex_addr(f[1])?.into(),
                // Masks of routes are contiguous: their length is their number of ones.
                prefix: mask.count_ones() as u8,
                gateway: flags & RTF_GATEWAY != 0,
                metric: f[6].parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0
veth1\t0B01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
garbage
";
        let routes = parse(text);
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert_eq!(
            routes[0],
            Route {
                iface: "eth0".into(),
                dest: Ipv4Addr::UNSPECIFIED.into(),
                prefix: 0,
                gateway: true,
                metric: 100,
            }
        );
        assert_eq!(routes[1].dest, Ipv4Addr::new(10, 244, 1, 11));
        assert_eq!((routes[1].prefix, routes[1].gateway), (32, false));
    }
}
