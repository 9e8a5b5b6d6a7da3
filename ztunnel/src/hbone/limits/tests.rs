//! The limit decisions, in process: admission at accept, the handshake queue, per-peer caps,
//! the descriptor headroom, and that every count returns to zero.

use super::*;

fn limits(change: impl FnOnce(&mut InboundLimits)) -> Arc<Limits> {
    let mut cfg = InboundLimits::default();
    change(&mut cfg);
    Limits::new(cfg)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "x", sa)
}

/// A connection from `addr` through its handshake as `sa`.
fn handshaken(l: &Arc<Limits>, addr: u8, sa: &str) -> Admitted {
    let mut a = l.admit(ip(addr)).expect("admitted");
    a.handshaken(&id(sa)).expect("identity admitted");
    a
}

/// Pretends the process has `free` descriptors left (the last sample, as the sampler would
/// have taken it now).
fn set_free(l: &Limits, free: usize) {
    let f = &l.fds;
    f.limit.store(10_000, Ordering::Relaxed);
    f.others
        .store(10_000 - free - l.inbound_descriptors(), Ordering::Relaxed);
}

#[test]
fn the_connection_cap_refuses_at_accept_and_frees_on_close() {
    let l = limits(|c| {
        c.max_connections = 2;
        c.max_handshakes = 2;
    });
    let a = l.admit(ip(1)).expect("first");
    let _b = l.admit(ip(2)).expect("second");
    assert_eq!(l.admit(ip(3)).err(), Some(Reason::Connections));
    assert_eq!(l.connections(), 2);
    drop(a);
    assert!(l.admit(ip(3)).is_ok(), "room again after a close");
}

#[tokio::test]
async fn at_the_handshake_cap_the_oldest_handshake_is_evicted() {
    let l = limits(|c| c.max_handshakes = 2);
    let oldest = l.admit(ip(1)).expect("first");
    let mut done = l.admit(ip(2)).expect("second");
    done.handshaken(&id("a")).expect("identity");
    let second_oldest = l.admit(ip(3)).expect("third");
    assert_eq!(l.handshakes(), 2);
    // The cap is reached: a newcomer is admitted and the oldest handshake told to close.
    let _new = l.admit(ip(4)).expect("a new connection is never kept out");
    tokio::time::timeout(Duration::from_secs(1), oldest.evicted())
        .await
        .expect("the oldest handshake is evicted");
    let not_yet = tokio::time::timeout(Duration::from_millis(50), second_oldest.evicted()).await;
    assert!(not_yet.is_err(), "only one handshake makes room for one");
    tokio::time::timeout(Duration::from_millis(50), done.evicted())
        .await
        .expect_err("a finished handshake is never evicted");
    drop(oldest);
    assert_eq!(l.handshakes(), 2, "second-oldest and the newcomer");
}

#[test]
fn connections_per_address_and_per_identity_are_capped() {
    let l = limits(|c| c.peer_max_connections = 2);
    let _a = handshaken(&l, 1, "a");
    let _b = handshaken(&l, 1, "b");
    assert_eq!(
        l.admit(ip(1)).err(),
        Some(Reason::PeerConnections),
        "a third connection from one address"
    );
    let _c = handshaken(&l, 2, "a");
    let mut d = l.admit(ip(3)).expect("another address");
    assert_eq!(
        d.handshaken(&id("a")).err(),
        Some(Reason::PeerConnections),
        "a third connection of one identity"
    );
}

#[test]
fn streams_per_identity_and_per_address_are_capped() {
    let l = limits(|c| c.peer_max_streams = 3);
    let a1 = handshaken(&l, 1, "a");
    let a2 = handshaken(&l, 2, "a");
    let s: Vec<_> = (0..3)
        .map(|i| {
            if i % 2 == 0 { &a1 } else { &a2 }
                .open_stream()
                .expect("stream")
        })
        .collect();
    assert_eq!(
        a2.open_stream().err(),
        Some(Reason::PeerStreams),
        "the identity's streams over its connections count together"
    );
    let b = handshaken(&l, 3, "b");
    assert!(b.open_stream().is_ok(), "other identities are not affected");
    drop(s);
    assert!(a1.open_stream().is_ok(), "closed streams free their places");
    assert_eq!(Reason::PeerStreams.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn low_on_descriptors_the_heaviest_peer_is_refused_and_light_ones_are_not() {
    let l = limits(|c| c.fd_headroom = 100);
    let abuser = handshaken(&l, 1, "abuser");
    let streams: Vec<_> = (0..50)
        .map(|_| abuser.open_stream().expect("stream"))
        .collect();
    let light = handshaken(&l, 2, "light");
    let one = light.open_stream().expect("stream");
    set_free(&l, 500);
    assert!(abuser.open_stream().is_ok(), "plenty left: no one refused");
    set_free(&l, 50);
    assert_eq!(
        abuser.open_stream().err(),
        Some(Reason::Descriptors),
        "below the headroom the peer holding most is refused"
    );
    assert!(
        light.open_stream().is_ok(),
        "a light peer still gets streams"
    );
    assert_eq!(
        l.admit(ip(1)).err(),
        Some(Reason::Descriptors),
        "and the abuser's address gets no new connection"
    );
    assert!(l.admit(ip(9)).is_ok(), "a new address does");
    drop((streams, one));
}

#[test]
fn every_count_returns_to_zero() {
    let l = limits(|_| {});
    {
        let a = handshaken(&l, 1, "a");
        let _s = a.open_stream().expect("stream");
        let _pending = l.admit(ip(2)).expect("in handshake");
        assert_eq!(l.in_use(), 2 + FDS_PER_STREAM);
        assert_eq!(l.handshakes(), 1);
    }
    assert_eq!((l.in_use(), l.handshakes(), l.connections()), (0, 0, 0));
    assert_eq!(
        l.addresses.len.load(Ordering::Relaxed),
        0,
        "peers forgotten"
    );
    assert_eq!(l.identities.len.load(Ordering::Relaxed), 0);
}

#[test]
fn refusals_are_counted_by_reason() {
    let l = limits(|c| c.max_connections = 1);
    let _a = l.admit(ip(1)).expect("first");
    for _ in 0..3 {
        let reason = l.admit(ip(2)).expect_err("over the cap");
        l.refused_connection(reason, "10.0.0.2:1000".parse().expect("addr"), "test");
    }
    let mut r = Registry::default();
    l.register(&mut r);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &r).expect("encode");
    assert!(
        text.contains(
            "ztunnel_hbone_inbound_refused_connections_total{reason=\"max_connections\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains("ztunnel_hbone_inbound_connections 1"),
        "{text}"
    );
}
