//! DHCP for a guest behind an isolation (a fork, see `isolate`): its
//! namespace answers it, with the address its memory belongs to.
//!
//! A fork's guest normally holds an infinite lease from before its snapshot
//! and never asks again. But a snapshot taken while the source was still
//! booting holds a guest that has not asked yet: restored behind its
//! isolation, it broadcasts a DHCPDISCOVER on a TAP that no DHCP server can
//! hear (the namespace routes, it does not bridge), and it would come up
//! without an address. So each isolation gets this small server on its TAP:
//! whatever the guest asks, the answer is its inner address, the bridge as
//! router and DNS server, and an infinite lease (as dnsmasq gives on the
//! bridge, see dhcp.rs).
//!
//! The guest is untrusted: a packet is read only within its length, anything
//! that is not a well-formed Ethernet BOOTREQUEST is dropped, and one answer
//! (at most 300-odd bytes) goes back per packet, to the guest's own TAP only
//! (the socket is bound to that device before it is bound to port 67, so a
//! DHCP broadcast from the bridge side never reaches it).

use super::ipam::BridgeNet;
use std::net::{Ipv4Addr, SocketAddrV4};

/// What the guest is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The guest's (inner) address.
    pub ip: Ipv4Addr,
    /// The bridge's network: its mask, and its address as router, DNS
    /// server and server identifier, as the bridge's dnsmasq would say.
    pub net: BridgeNet,
}

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHERNET: u8 = 1;
/// op .. file: the fixed BOOTP header before the magic cookie.
const HEADER: usize = 236;
/// The DHCP magic cookie, between the BOOTP header and the options.
pub(super) const COOKIE: [u8; 4] = [0x63, 0x82, 0x53, 0x63];

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_END: u8 = 255;

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// A reply and where it goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub packet: Vec<u8>,
    pub to: SocketAddrV4,
}

/// The options of a request that matter here.
struct Asked {
    message_type: Option<u8>,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
}

/// Reads the options after the cookie; `None` when one runs past the end.
fn options(mut rest: &[u8]) -> Option<Asked> {
    let mut asked = Asked {
        message_type: None,
        requested_ip: None,
        server_id: None,
    };
    let ip = |v: &[u8]| <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from);
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            OPT_PAD => rest = tail,
            OPT_END => break,
            _ => {
                let (&len, tail) = tail.split_first()?;
                let value = tail.get(..usize::from(len))?;
                match code {
                    OPT_MESSAGE_TYPE if len == 1 => asked.message_type = Some(value[0]),
                    OPT_REQUESTED_IP => asked.requested_ip = ip(value),
                    OPT_SERVER_ID => asked.server_id = ip(value),
                    _ => {}
                }
                rest = &tail[usize::from(len)..];
            }
        }
    }
    Some(asked)
}

/// The reply to one datagram from the guest, or `None` when there is none
/// to give (not a DHCP request, a release, a request meant for another
/// server, malformed).
pub fn answer(request: &[u8], lease: &Lease) -> Option<Answer> {
    if request.len() < HEADER + COOKIE.len()
        || request[0] != BOOTREQUEST
        || request[1] != HTYPE_ETHERNET
        || request[2] != 6
        || request[HEADER..HEADER + 4] != COOKIE
    {
        return None;
    }
    let asked = options(&request[HEADER + 4..])?;
    let ciaddr = Ipv4Addr::new(request[12], request[13], request[14], request[15]);
    let (kind, yiaddr) = match asked.message_type? {
        DISCOVER => (OFFER, lease.ip),
        REQUEST => {
            // A REQUEST answering another server's offer is not ours to take.
            if asked.server_id.is_some_and(|s| s != lease.net.bridge_ip) {
                return None;
            }
            let wanted = asked
                .requested_ip
                .or((!ciaddr.is_unspecified()).then_some(ciaddr));
            if wanted.is_some_and(|w| w != lease.ip) {
                (NAK, Ipv4Addr::UNSPECIFIED)
            } else {
                (ACK, lease.ip)
            }
        }
        // RELEASE, DECLINE, INFORM and the rest: nothing to say.
        _ => return None,
    };
    let mut p = Vec::with_capacity(300);
    p.extend_from_slice(&[BOOTREPLY, HTYPE_ETHERNET, 6, 0]);
    p.extend_from_slice(&request[4..8]); // xid
    p.extend_from_slice(&[0, 0]); // secs
    p.extend_from_slice(&request[10..12]); // flags (the broadcast bit)
    let keep_ciaddr = kind == ACK && !ciaddr.is_unspecified();
    p.extend_from_slice(
        &if keep_ciaddr {
            ciaddr
        } else {
            Ipv4Addr::UNSPECIFIED
        }
        .octets(),
    );
    p.extend_from_slice(&yiaddr.octets());
    p.extend_from_slice(&[0; 4]); // siaddr
    p.extend_from_slice(&request[24..28]); // giaddr
    p.extend_from_slice(&request[28..44]); // chaddr
    p.resize(HEADER, 0); // sname, file
    p.extend_from_slice(&COOKIE);
    let gateway = lease.net.bridge_ip.octets();
    p.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind]);
    p.extend_from_slice(&[OPT_SERVER_ID, 4]);
    p.extend_from_slice(&gateway);
    if kind != NAK {
        p.extend_from_slice(&[OPT_LEASE_TIME, 4, 0xff, 0xff, 0xff, 0xff]);
        p.extend_from_slice(&[OPT_SUBNET_MASK, 4]);
        p.extend_from_slice(&lease.net.netmask().octets());
        p.extend_from_slice(&[OPT_ROUTER, 4]);
        p.extend_from_slice(&gateway);
        p.extend_from_slice(&[OPT_DNS, 4]);
        p.extend_from_slice(&gateway);
    }
    p.push(OPT_END);
    // The BOOTP minimum, which some clients insist on.
    if p.len() < 300 {
        p.resize(300, 0);
    }
    // A client that already has its address (a renewal) is answered there;
    // one that has none cannot receive unicast yet: broadcast on its TAP.
    let to = if keep_ciaddr {
        SocketAddrV4::new(ciaddr, 68)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 68)
    };
    Some(Answer { packet: p, to })
}

/// The server's socket: UDP port 67 on `tap` only. Call on a thread inside
/// the isolation's namespace (`isolate::in_netns`).
pub fn bind(tap: &str) -> Result<std::net::UdpSocket, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err =
        |what: &str, e: std::io::Error| format!("the fork's DHCP socket on {tap}: {what}: {e}");
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| err("socket", e))?;
    // Before the bind: from then on only the TAP's datagrams are queued.
    s.bind_device(Some(tap.as_bytes()))
        .map_err(|e| err("SO_BINDTODEVICE", e))?;
    s.set_broadcast(true).map_err(|e| err("SO_BROADCAST", e))?;
    s.set_nonblocking(true)
        .map_err(|e| err("non-blocking", e))?;
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67);
    s.bind(&any.into()).map_err(|e| err("bind to port 67", e))?;
    Ok(s.into())
}

/// Answers the guest on `socket` (from `bind`) until the task is aborted.
pub async fn serve(socket: std::net::UdpSocket, lease: Lease, netns: String) {
    let socket = match tokio::net::UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%netns, "the fork's DHCP socket: {e}");
            return;
        }
    };
    // A DHCP message fits an Ethernet frame; anything longer is cut and then
    // refused by `answer` only if what is left is malformed.
    let mut buf = vec![0u8; 1500];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(%netns, "the fork's DHCP socket: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(a) = answer(&buf[..n], &lease) else {
            continue;
        };
        match socket.send_to(&a.packet, a.to).await {
            Ok(_) => tracing::debug!(%netns, ip = %lease.ip, "answered the guest's DHCP request"),
            Err(e) => tracing::warn!(%netns, "answering the guest's DHCP request: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Lease = Lease {
        ip: Ipv4Addr::new(172, 16, 0, 10),
        net: BridgeNet {
            bridge_ip: Ipv4Addr::new(172, 16, 0, 1),
            prefix: 24,
        },
    };
    const MAC: [u8; 6] = [0x02, 0xfc, 0xac, 0x10, 0x00, 0x0a];

    /// A BOOTREQUEST as a client sends it, with `opts` after the cookie.
    fn request(ciaddr: Ipv4Addr, broadcast: bool, opts: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HEADER];
        p[0] = BOOTREQUEST;
        p[1] = HTYPE_ETHERNET;
        p[2] = 6;
        p[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        if broadcast {
            p[10] = 0x80;
        }
        p[12..16].copy_from_slice(&ciaddr.octets());
        p[28..34].copy_from_slice(&MAC);
        p.extend_from_slice(&COOKIE);
        p.extend_from_slice(opts);
        p.push(OPT_END);
        p
    }

    /// The reply's message type, options and fixed fields.
    fn read(a: &Answer) -> (u8, Ipv4Addr, Vec<(u8, Vec<u8>)>) {
        let p = &a.packet;
        assert_eq!(p[0], BOOTREPLY);
        assert_eq!(
            &p[4..8],
            &[0xde, 0xad, 0xbe, 0xef],
            "the xid is the request's"
        );
        assert_eq!(&p[28..34], &MAC, "chaddr is the request's");
        assert_eq!(&p[HEADER..HEADER + 4], &COOKIE);
        let mut opts = Vec::new();
        let mut rest = &p[HEADER + 4..];
        while let Some((&code, tail)) = rest.split_first() {
            if code == OPT_END {
                break;
            }
            let len = usize::from(tail[0]);
            opts.push((code, tail[1..1 + len].to_vec()));
            rest = &tail[1 + len..];
        }
        let kind = opts.iter().find(|(c, _)| *c == OPT_MESSAGE_TYPE).unwrap().1[0];
        let yiaddr = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        (kind, yiaddr, opts)
    }

    fn opt(opts: &[(u8, Vec<u8>)], code: u8) -> Option<Vec<u8>> {
        opts.iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn a_discover_and_its_request_get_the_inner_address_for_good() {
        let offer = answer(
            &request(
                Ipv4Addr::UNSPECIFIED,
                false,
                &[OPT_MESSAGE_TYPE, 1, DISCOVER],
            ),
            &LEASE,
        )
        .unwrap();
        assert_eq!(offer.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        let (kind, yiaddr, opts) = read(&offer);
        assert_eq!((kind, yiaddr), (OFFER, LEASE.ip));
        assert_eq!(opt(&opts, OPT_SUBNET_MASK).unwrap(), [255, 255, 255, 0]);
        assert_eq!(opt(&opts, OPT_ROUTER).unwrap(), [172, 16, 0, 1]);
        assert_eq!(opt(&opts, OPT_DNS).unwrap(), [172, 16, 0, 1]);
        assert_eq!(opt(&opts, OPT_SERVER_ID).unwrap(), [172, 16, 0, 1]);
        assert_eq!(opt(&opts, OPT_LEASE_TIME).unwrap(), [0xff; 4], "infinite");
        assert!(offer.packet.len() >= 300);

        let req = request(
            Ipv4Addr::UNSPECIFIED,
            true,
            &[
                OPT_MESSAGE_TYPE,
                1,
                REQUEST,
                OPT_REQUESTED_IP,
                4,
                172,
                16,
                0,
                10,
                OPT_SERVER_ID,
                4,
                172,
                16,
                0,
                1,
            ],
        );
        let ack = answer(&req, &LEASE).unwrap();
        let (kind, yiaddr, _) = read(&ack);
        assert_eq!((kind, yiaddr), (ACK, LEASE.ip));
        assert_eq!(ack.packet[10], 0x80, "the broadcast flag is kept");
        // A renewal from the address it holds is answered there.
        let renew = request(LEASE.ip, false, &[OPT_MESSAGE_TYPE, 1, REQUEST]);
        let ack = answer(&renew, &LEASE).unwrap();
        assert_eq!(read(&ack).0, ACK);
        assert_eq!(ack.to, SocketAddrV4::new(LEASE.ip, 68));
        assert_eq!(&ack.packet[12..16], &LEASE.ip.octets());
    }

    #[test]
    fn any_other_address_is_refused_and_other_servers_offers_are_left_alone() {
        let other = request(
            Ipv4Addr::UNSPECIFIED,
            false,
            &[
                OPT_MESSAGE_TYPE,
                1,
                REQUEST,
                OPT_REQUESTED_IP,
                4,
                172,
                16,
                0,
                11,
            ],
        );
        let nak = answer(&other, &LEASE).unwrap();
        let (kind, yiaddr, opts) = read(&nak);
        assert_eq!((kind, yiaddr), (NAK, Ipv4Addr::UNSPECIFIED));
        assert_eq!(opt(&opts, OPT_LEASE_TIME), None);
        assert_eq!(nak.to, SocketAddrV4::new(Ipv4Addr::BROADCAST, 68));
        let renew_other = request(
            Ipv4Addr::new(10, 0, 0, 5),
            false,
            &[OPT_MESSAGE_TYPE, 1, REQUEST],
        );
        assert_eq!(read(&answer(&renew_other, &LEASE).unwrap()).0, NAK);
        let elsewhere = request(
            Ipv4Addr::UNSPECIFIED,
            false,
            &[OPT_MESSAGE_TYPE, 1, REQUEST, OPT_SERVER_ID, 4, 10, 0, 0, 1],
        );
        assert_eq!(answer(&elsewhere, &LEASE), None);
        for kind in [4u8, 7, 8, 2, 5, 200] {
            let r = request(Ipv4Addr::UNSPECIFIED, false, &[OPT_MESSAGE_TYPE, 1, kind]);
            assert_eq!(answer(&r, &LEASE), None, "message type {kind}");
        }
    }

    #[test]
    fn malformed_packets_get_no_answer() {
        let good = request(
            Ipv4Addr::UNSPECIFIED,
            false,
            &[OPT_MESSAGE_TYPE, 1, DISCOVER],
        );
        assert!(answer(&good, &LEASE).is_some());
        // Every cut of a good packet, short or mid-option.
        for n in 0..good.len() - 1 {
            let cut = &good[..n];
            if let Some(a) = answer(cut, &LEASE) {
                // Only a cut after the whole message-type option may answer.
                assert!(n >= HEADER + 4 + 3, "answered {n} bytes: {a:?}");
            }
        }
        let mut bad = good.clone();
        bad[0] = BOOTREPLY;
        assert_eq!(answer(&bad, &LEASE), None, "a reply");
        let mut bad = good.clone();
        bad[1] = 6;
        assert_eq!(answer(&bad, &LEASE), None, "not Ethernet");
        let mut bad = good.clone();
        bad[HEADER] = 0;
        assert_eq!(answer(&bad, &LEASE), None, "no cookie");
        // An option whose length runs past the end.
        let long = request(
            Ipv4Addr::UNSPECIFIED,
            false,
            &[OPT_MESSAGE_TYPE, 1, DISCOVER, 12, 200, b'x'],
        );
        let long = &long[..long.len() - 1];
        assert_eq!(answer(long, &LEASE), None);
        // No message type: plain BOOTP, not served.
        assert_eq!(
            answer(&request(Ipv4Addr::UNSPECIFIED, false, &[]), &LEASE),
            None
        );
        // Pads and unknown options are skipped.
        let padded = request(
            Ipv4Addr::UNSPECIFIED,
            false,
            &[
                OPT_PAD,
                OPT_PAD,
                12,
                3,
                b'a',
                b'b',
                b'c',
                OPT_MESSAGE_TYPE,
                1,
                DISCOVER,
            ],
        );
        assert_eq!(read(&answer(&padded, &LEASE).unwrap()).0, OFFER);
    }
}
