//! A minimal reader for the classic pcap files tcpdump writes, and the questions tests ask of
//! them: which TCP connections and ports carried data, and whether a marker crossed in clear.
//!
//! Parsing it ourselves (Ethernet / IPv4 or IPv6 / TCP+UDP only) keeps assertions independent of
//! tshark's field names and versions; tshark stays available for humans reading the files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// IP protocol numbers.
pub const TCP: u8 = 6;
/// See [`TCP`].
pub const UDP: u8 = 17;

/// One IPv6 packet of a capture. `proto` is the fixed header's next header: extension headers
/// are not walked (the cluster's traffic has none), so a packet with one shows its number.
#[derive(Debug, Clone)]
pub struct Packet6 {
    /// Source address.
    pub src: Ipv6Addr,
    /// Destination address.
    pub dst: Ipv6Addr,
    /// Next header ([`TCP`], [`UDP`], 58 for ICMPv6, ...).
    pub proto: u8,
    /// Source port (TCP/UDP), else 0.
    pub sport: u16,
    /// Destination port (TCP/UDP), else 0.
    pub dport: u16,
    /// TCP payload (UDP: datagram payload).
    pub payload: Vec<u8>,
}

impl Packet6 {
    /// Whether either port is `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.sport == port || self.dport == port
    }
}

/// One IPv4 packet of a capture (other frames are skipped).
#[derive(Debug, Clone)]
pub struct Packet {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// Source port (TCP/UDP, else 0).
    pub sport: u16,
    /// Destination port (TCP/UDP, else 0).
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// Transport payload as captured.
    pub payload: Vec<u8>,
}

impl Packet {
    /// A TCP SYN without ACK: the client's first packet.
    pub fn is_syn(&self) -> bool {
        self.proto == TCP && self.tcp_flags & 0x02 != 0 && self.tcp_flags & 0x10 == 0
    }

    /// Whether either port is `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.sport == port || self.dport == port
    }

    /// Whether the packet is between `a` and `b`, either direction.
    pub fn between(&self, a: Ipv4Addr, b: Ipv4Addr) -> bool {
        (self.src == a && self.dst == b) || (self.src == b && self.dst == a)
    }
}

/// A TCP connection seen in a capture.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    /// Connecting side (from the SYN; without one, the side with the higher port).
    pub client: SocketAddrV4,
    /// Listening side.
    pub server: SocketAddrV4,
    /// Packets in both directions.
    pub packets: usize,
    /// Payload bytes in both directions.
    pub payload_bytes: usize,
}

/// A parsed capture file.
#[derive(Debug, Clone)]
pub struct Pcap {
    /// Where the file is.
    pub path: PathBuf,
    /// IPv4 packets in capture order.
    pub packets: Vec<Packet>,
    /// IPv6 packets in capture order.
    pub packets6: Vec<Packet6>,
    raw: Vec<u8>,
}

impl Pcap {
    /// Reads and parses a capture file.
    pub fn open(path: &Path) -> Result<Pcap> {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (packets, packets6) =
            parse(&raw).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Pcap {
            path: path.to_path_buf(),
            packets,
            packets6,
            raw,
        })
    }

    /// `(src, dst, dport)` of every TCP/UDP packet.
    pub fn tuples(&self) -> BTreeSet<(Ipv4Addr, Ipv4Addr, u16)> {
        self.packets
            .iter()
            .filter(|p| p.proto == TCP || p.proto == UDP)
            .map(|p| (p.src, p.dst, p.dport))
            .collect()
    }

    /// TCP connections, one entry per 4-tuple.
    pub fn flows(&self) -> Vec<Flow> {
        let mut servers: BTreeSet<SocketAddrV4> = BTreeSet::new();
        for p in self.packets.iter().filter(|p| p.is_syn()) {
            servers.insert(SocketAddrV4::new(p.dst, p.dport));
        }
        let mut flows: BTreeMap<(SocketAddrV4, SocketAddrV4), Flow> = BTreeMap::new();
        for p in self.packets.iter().filter(|p| p.proto == TCP) {
            let s = SocketAddrV4::new(p.src, p.sport);
            let d = SocketAddrV4::new(p.dst, p.dport);
            let (client, server) = if servers.contains(&d) && !servers.contains(&s) {
                (s, d)
            } else if servers.contains(&s) && !servers.contains(&d) {
                (d, s)
            } else if p.sport > p.dport {
                (s, d)
            } else {
                (d, s)
            };
            let f = flows.entry((client, server)).or_insert(Flow {
                client,
                server,
                packets: 0,
                payload_bytes: 0,
            });
            f.packets += 1;
            f.payload_bytes += p.payload.len();
        }
        flows.into_values().collect()
    }

    /// Server ports of TCP flows that carried payload between `a` and `b` (either direction).
    pub fn payload_ports_between(&self, a: Ipv4Addr, b: Ipv4Addr) -> BTreeSet<u16> {
        self.flows()
            .into_iter()
            .filter(|f| f.payload_bytes > 0)
            .filter(|f| {
                let (c, s) = (*f.client.ip(), *f.server.ip());
                (c == a && s == b) || (c == b && s == a)
            })
            .map(|f| f.server.port())
            .collect()
    }

    /// Total TCP payload bytes on packets with `port` on either side.
    pub fn payload_bytes_on_port(&self, port: u16) -> usize {
        self.packets
            .iter()
            .filter(|p| p.proto == TCP && p.has_port(port))
            .map(|p| p.payload.len())
            .sum()
    }

    /// Whether `marker` appears in clear anywhere: in the raw file, in one packet's payload, or
    /// across segment boundaries of one direction of a TCP connection.
    pub fn contains(&self, marker: &[u8]) -> bool {
        if marker.is_empty() {
            return false;
        }
        if find(&self.raw, marker) {
            return true;
        }
        let mut streams: BTreeMap<(Ipv4Addr, u16, Ipv4Addr, u16), Vec<u8>> = BTreeMap::new();
        for p in self.packets.iter().filter(|p| p.proto == TCP) {
            streams
                .entry((p.src, p.sport, p.dst, p.dport))
                .or_default()
                .extend_from_slice(&p.payload);
        }
        let mut streams6: BTreeMap<(Ipv6Addr, u16, Ipv6Addr, u16), Vec<u8>> = BTreeMap::new();
        for p in self.packets6.iter().filter(|p| p.proto == TCP) {
            streams6
                .entry((p.src, p.sport, p.dst, p.dport))
                .or_default()
                .extend_from_slice(&p.payload);
        }
        streams
            .values()
            .chain(streams6.values())
            .any(|s| find(s, marker))
    }

    /// Payload bytes of IPv6 TCP packets with `port` on either side.
    pub fn payload_bytes6_on_port(&self, port: u16) -> usize {
        self.packets6
            .iter()
            .filter(|p| p.proto == TCP && p.has_port(port))
            .map(|p| p.payload.len())
            .sum()
    }

    /// Packets between `a` and `b` (either direction) that are not TCP to or from `port`, as
    /// `src:port -> dst:port` lines: what crossed outside the tunnel.
    pub fn between_outside_tcp_port(&self, a: Ipv4Addr, b: Ipv4Addr, port: u16) -> Vec<String> {
        self.packets
            .iter()
            .filter(|p| p.between(a, b))
            .filter(|p| p.proto != TCP || !p.has_port(port))
            .map(|p| format!("{}:{} -> {}:{}", p.src, p.sport, p.dst, p.dport))
            .collect()
    }

    /// A human-readable list of flows, for reports and assertion messages.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for f in self.flows() {
            out.push_str(&format!(
                "  {} -> {}  packets {} payload {} B\n",
                f.client, f.server, f.packets, f.payload_bytes
            ));
        }
        let other = self.packets.iter().filter(|p| p.proto != TCP).count();
        if other > 0 {
            out.push_str(&format!("  + {other} non-TCP IPv4 packets\n"));
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn parse(raw: &[u8]) -> Result<(Vec<Packet>, Vec<Packet6>)> {
    if raw.len() < 24 {
        bail!("shorter than a pcap header ({} bytes)", raw.len());
    }
    let magic = [raw[0], raw[1], raw[2], raw[3]];
    let big = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        _ => bail!("not a classic pcap file (magic {magic:02x?}); pcapng is not supported"),
    };
    let u32_at = |b: &[u8], off: usize| -> Option<u32> {
        let s: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    };
    let linktype = u32_at(raw, 20).context("header")?;
    let mut out = Vec::new();
    let mut out6 = Vec::new();
    let mut off = 24;
    while off + 16 <= raw.len() {
        let caplen = u32_at(raw, off + 8).context("record header")? as usize;
        let start = off + 16;
        let Some(frame) = raw.get(start..start + caplen) else {
            break; // truncated last record: tcpdump was stopped mid-write
        };
        off = start + caplen;
        let ip = match linktype {
            1 => ethernet_payload(frame),
            113 => frame
                .get(16..)
                .filter(|_| matches!(frame.get(14..16), Some(&[0x08, 0x00]) | Some(&[0x86, 0xdd]))),
            101 => Some(frame),
            _ => bail!("unsupported link type {linktype}"),
        };
        if let Some(p) = ip.and_then(ipv4) {
            out.push(p);
        } else if let Some(p) = ip.and_then(ipv6) {
            out6.push(p);
        }
    }
    Ok((out, out6))
}

fn ethernet_payload(frame: &[u8]) -> Option<&[u8]> {
    let mut ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let mut off = 14;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes(frame.get(16..18)?.try_into().ok()?);
        off = 18;
    }
    matches!(ethertype, 0x0800 | 0x86dd)
        .then(|| frame.get(off..))
        .flatten()
}

fn ipv6(b: &[u8]) -> Option<Packet6> {
    if b.first()? >> 4 != 6 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes(b.get(4..6)?.try_into().ok()?));
    let proto = *b.get(6)?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(b.get(8..24)?).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(b.get(24..40)?).ok()?);
    // Offloaded super-packets may carry payload length 0; then trust the captured length.
    let end = if len > 0 {
        (40 + len).min(b.len())
    } else {
        b.len()
    };
    let l4 = b.get(40..end)?;
    let port = |o: usize| -> u16 {
        l4.get(o..o + 2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_be_bytes)
            .unwrap_or(0)
    };
    let (sport, dport, payload) = match proto {
        TCP => {
            let doff = usize::from(*l4.get(12)? >> 4) * 4;
            (port(0), port(2), l4.get(doff..).unwrap_or(&[]))
        }
        UDP => (port(0), port(2), l4.get(8..).unwrap_or(&[])),
        _ => (0, 0, l4),
    };
    Some(Packet6 {
        src,
        dst,
        proto,
        sport,
        dport,
        payload: payload.to_vec(),
    })
}

fn ipv4(b: &[u8]) -> Option<Packet> {
    if b.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?));
    // Offloaded super-packets may carry total length 0; then trust the captured length.
    let end = if total >= ihl {
        total.min(b.len())
    } else {
        b.len()
    };
    let proto = *b.get(9)?;
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(b.get(12..16)?).ok()?);
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(b.get(16..20)?).ok()?);
    let l4 = b.get(ihl..end)?;
    let port = |o: usize| -> u16 {
        l4.get(o..o + 2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_be_bytes)
            .unwrap_or(0)
    };
    let (sport, dport, tcp_flags, payload) = match proto {
        TCP => {
            let doff = usize::from(*l4.get(12)? >> 4) * 4;
            (
                port(0),
                port(2),
                *l4.get(13)?,
                l4.get(doff..).unwrap_or(&[]),
            )
        }
        UDP => (port(0), port(2), 0, l4.get(8..).unwrap_or(&[])),
        _ => (0, 0, 0, l4),
    };
    Some(Packet {
        src,
        dst,
        proto,
        sport,
        dport,
        tcp_flags,
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        flags: u8,
        data: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = u16::try_from(20 + 20 + data.len()).expect("small");
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, TCP, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[0x50, flags, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn parses_flows_and_finds_split_markers() {
        let mut raw = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        raw.extend_from_slice(&[0; 8]);
        raw.extend_from_slice(&65535u32.to_le_bytes());
        raw.extend_from_slice(&1u32.to_le_bytes());
        let (a, b) = ([10, 244, 1, 11], [10, 244, 2, 11]);
        for f in [
            frame(a, b, 40000, 15008, 0x02, b""),
            frame(b, a, 15008, 40000, 0x12, b""),
            frame(a, b, 40000, 15008, 0x18, b"xxSEC"),
            frame(a, b, 40000, 15008, 0x18, b"RETyy"),
        ] {
            let len = u32::try_from(f.len()).expect("small");
            raw.extend_from_slice(&[0; 8]);
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&f);
        }
        let (pkts, pkts6) = parse(&raw).expect("parses");
        assert_eq!(pkts.len(), 4);
        assert!(pkts6.is_empty());
        let pcap = Pcap {
            path: PathBuf::new(),
            packets: pkts,
            packets6: pkts6,
            raw,
        };
        let flows = pcap.flows();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].server, "10.244.2.11:15008".parse().expect("addr"));
        assert_eq!(flows[0].payload_bytes, 10);
        assert!(pcap.contains(b"SECRET"), "split across segments");
        assert!(!pcap.contains(b"NOPE"));
        let ports = pcap.payload_ports_between(a.into(), b.into());
        assert_eq!(ports, BTreeSet::from([15008]));
    }

    /// An Ethernet + IPv6 + TCP frame.
    fn frame6(src: &str, dst: &str, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let ip = |a: &str| a.parse::<Ipv6Addr>().expect("v6").octets();
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        let len = u16::try_from(20 + data.len()).expect("small");
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[TCP, 64]);
        f.extend_from_slice(&ip(src));
        f.extend_from_slice(&ip(dst));
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn parses_ipv6_tcp_and_finds_split_markers() {
        let mut raw = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        raw.extend_from_slice(&[0; 8]);
        raw.extend_from_slice(&65535u32.to_le_bytes());
        raw.extend_from_slice(&1u32.to_le_bytes());
        let (a, b) = ("fd00:10:244:1::11", "fd00:10:244:2::11");
        for f in [
            frame6(a, b, 40000, 15008, b"xxSEC"),
            frame6(a, b, 40000, 15008, b"RETyy"),
        ] {
            let len = u32::try_from(f.len()).expect("small");
            raw.extend_from_slice(&[0; 8]);
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&f);
        }
        let (pkts, pkts6) = parse(&raw).expect("parses");
        assert!(pkts.is_empty());
        assert_eq!(pkts6.len(), 2);
        assert_eq!(pkts6[0].src, a.parse::<Ipv6Addr>().expect("v6"));
        assert_eq!((pkts6[0].proto, pkts6[0].dport), (TCP, 15008));
        let pcap = Pcap {
            path: PathBuf::new(),
            packets: pkts,
            packets6: pkts6,
            raw: Vec::new(),
        };
        assert!(pcap.contains(b"SECRET"), "split across IPv6 segments");
        assert_eq!(pcap.payload_bytes6_on_port(15008), 10);
    }
}
