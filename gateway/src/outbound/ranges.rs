//! Address ranges the gateway never connects to unless an operator allow-lists them
//! (`[outbound] allow_cidrs`): loopback, link-local (with the cloud metadata address
//! 169.254.169.254), private networks, shared address space, unspecified, broadcast,
//! multicast, documentation and other special-purpose ranges (IANA special-purpose registries),
//! and the IPv4-mapped, IPv4-compatible and NAT64 forms of the IPv4 ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is refused: the name of its special-purpose range (for logs, never sent to
/// the client).
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let range = match (a, b, c) {
        (0, _, _) => "this network (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local and cloud metadata (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) => "documentation (192.0.2.0/24)",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (198, 51, 100) => "documentation (198.51.100.0/24)",
        (203, 0, 113) => "documentation (203.0.113.0/24)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved and broadcast (240.0.0.0/4)",
        _ => return None,
    };
    Some(range)
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // The IPv4 forms first: ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible, deprecated),
    // 64:ff9b::a.b.c.d (NAT64) reach the IPv4 address they carry.
    let seg = ip.segments();
    let embedded = if seg[..5] == [0, 0, 0, 0, 0] && (seg[5] == 0xffff || seg[5] == 0) {
        let o = ip.octets();
        // `::` and `::1` are the IPv6 unspecified and loopback addresses, handled below.
        (seg[5] == 0xffff || seg[6] != 0).then(|| Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let o = ip.octets();
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return forbidden_v4(v4).map(|_| "IPv4-embedded IPv6 of a refused IPv4 range");
    }
    let range = match seg[0] {
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if ip.is_loopback() => "loopback (::1)",
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local (fe80::/10)",
        0xfec0..=0xfeff => "site-local (fec0::/10, deprecated)",
        0xff00..=0xffff => "multicast (ff00::/8)",
        0x0100 if seg[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        0x2001 if seg[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x2001 if seg[1] < 0x0200 => "IETF protocol assignments (2001::/23)",
        0x2002 => "6to4 (2002::/16)",
        0x3fff if seg[1] < 0x1000 => "documentation (3fff::/20)",
        0x5f00 => "segment routing (5f00::/16)",
        _ => return None,
    };
    Some(range)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn special_purpose_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.7",
            "198.51.100.7",
            "203.0.113.7",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert!(forbidden_range(addr).is_some(), "{ip} must be refused");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "2400:cb00::1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(forbidden_range(addr), None, "{ip} must be allowed");
        }
    }
}
