//! Every firewall rule hatch needs lives in two nftables tables, `ip hatch`
//! (NAT, SSH forwards, what guests may reach on the host) and `bridge hatch`
//! (each guest pinned to its port, guest-to-guest policy), rebuilt as a
//! whole in a single atomic transaction from the desired state. Nothing is
//! edited in place, so nothing can leak: listing the tables shows exactly
//! what hatch wants now, and deleting them removes all.

use nftables::schema::Nftables;
use serde_json::{json, Value};

pub const TABLE: &str = "hatch";

/// One SSH forward: host port -> guest:22.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub vm_id: String,
    pub host_port: u16,
    pub guest_ip: String,
    pub guest_port: u16,
}

/// One VM's place on the bridge: the only MAC and IPv4 address its port
/// may send from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub vm_id: String,
    pub owner_id: String,
    /// The bridge ports that carry this VM's frames: its TAP, or the bridge
    /// end of its isolation's veth (a fork). Both names are pinned, so the
    /// pin holds whichever of them is plugged in.
    pub ports: Vec<String>,
    pub mac: String,
    pub ip: String,
}

/// Which guests may talk to each other directly (`HATCH_GUEST_TO_GUEST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestToGuest {
    /// Only guests of the same owner.
    #[default]
    Owner,
    /// No guest reaches another.
    None,
    /// Any guest reaches any other (one trusted tenant).
    All,
}

impl std::str::FromStr for GuestToGuest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "owner" | "" => Ok(GuestToGuest::Owner),
            "none" => Ok(GuestToGuest::None),
            "all" => Ok(GuestToGuest::All),
            other => Err(format!(
                "HATCH_GUEST_TO_GUEST must be owner, none or all, not {other:?}"
            )),
        }
    }
}

/// What the tables should hold.
#[derive(Debug, Clone)]
pub struct Desired {
    pub bridge: String,
    /// The bridge's own address: the guests' gateway, DHCP and DNS server.
    pub bridge_ip: String,
    /// The guests' network, e.g. `172.16.0.0/24`.
    pub guest_cidr: String,
    /// Sources allowed to use the SSH forwards (`0.0.0.0/0` for any).
    pub allowed_sources: Vec<String>,
    pub forwards: Vec<Forward>,
    /// Every VM that holds an address, running or not (a port is pinned
    /// before its VMM starts, so a guest is never unfiltered).
    pub guests: Vec<Guest>,
    pub guest_to_guest: GuestToGuest,
}

pub(super) fn prefix(cidr: &str) -> Value {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "32"));
    json!({ "prefix": { "addr": addr, "len": len.parse::<u32>().unwrap_or(32) } })
}

pub(super) fn matches(left: Value, op: &str, right: Value) -> Value {
    json!({ "match": { "op": op, "left": left, "right": right } })
}

pub(super) fn ip_field(field: &str) -> Value {
    json!({ "payload": { "protocol": "ip", "field": field } })
}

fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn set(items: impl IntoIterator<Item = impl Into<Value>>) -> Value {
    json!({ "set": items.into_iter().map(Into::into).collect::<Vec<Value>>() })
}

fn base_chain(family: &str, name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({ "add": { "chain": {
        "family": family, "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept"
    } } })
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    base_chain("ip", name, kind, hook, prio)
}

fn family_rule(family: &str, chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
    let mut r = json!({ "family": family, "table": TABLE, "chain": chain, "expr": expr });
    if let Some(c) = comment {
        r["comment"] = json!(c);
    }
    json!({ "add": { "rule": r } })
}

fn rule(chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
    family_rule("ip", chain, expr, comment)
}

fn bridge_rule(chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
    family_rule("bridge", chain, expr, comment)
}

/// Guests grouped as the guest-to-guest policy allows them to talk: one
/// group per owner with at least two guests (`Owner`), none at all (`None`).
/// `All` needs no groups: nothing between guests is filtered.
fn peer_groups(d: &Desired) -> Vec<Vec<&Guest>> {
    if d.guest_to_guest != GuestToGuest::Owner {
        return vec![];
    }
    let mut by_owner: std::collections::BTreeMap<&str, Vec<&Guest>> = Default::default();
    for g in &d.guests {
        by_owner.entry(&g.owner_id).or_default().push(g);
    }
    by_owner.into_values().filter(|g| g.len() > 1).collect()
}

/// The whole transaction: (re)create the table, then its chains and rules.
/// Adding before deleting makes the delete valid when the table is absent.
pub fn ruleset(d: &Desired) -> Value {
    let mut cmds = vec![
        json!({ "add": { "table": { "family": "ip", "name": TABLE } } }),
        json!({ "delete": { "table": { "family": "ip", "name": TABLE } } }),
        json!({ "add": { "table": { "family": "ip", "name": TABLE } } }),
        chain("prerouting", "nat", "prerouting", -100),
        chain("output", "nat", "output", -100),
        chain("postrouting", "nat", "postrouting", 100),
    ];
    // Guests reach the outside through NAT.
    cmds.push(rule(
        "postrouting",
        vec![
            matches(ip_field("saddr"), "==", prefix(&d.guest_cidr)),
            matches(ip_field("daddr"), "!=", prefix(&d.guest_cidr)),
            json!({ "masquerade": null }),
        ],
        Some("guest NAT"),
    ));
    // A forward used from the host's own loopback leaves with a 127/8 source,
    // which the guest cannot answer: give it the bridge's address.
    cmds.push(rule(
        "postrouting",
        vec![
            matches(ip_field("saddr"), "==", prefix("127.0.0.0/8")),
            matches(
                json!({ "meta": { "key": "oifname" } }),
                "==",
                json!(d.bridge),
            ),
            json!({ "masquerade": null }),
        ],
        Some("loopback to guests"),
    ));
    let any_source = d.allowed_sources.iter().any(|s| s == "0.0.0.0/0");
    for f in &d.forwards {
        let mut expr = vec![matches(
            json!({ "fib": { "result": "type", "flags": ["daddr"] } }),
            "==",
            json!("local"),
        )];
        if !any_source {
            let set: Vec<Value> = d.allowed_sources.iter().map(|s| prefix(s)).collect();
            expr.push(matches(ip_field("saddr"), "==", json!({ "set": set })));
        }
        expr.push(matches(
            json!({ "payload": { "protocol": "tcp", "field": "dport" } }),
            "==",
            json!(f.host_port),
        ));
        expr.push(json!({ "dnat": { "family": "ip", "addr": f.guest_ip, "port": f.guest_port } }));
        // output: from this host itself; prerouting: from other hosts, but
        // not from guests: a forward is a host address, which guests may
        // not use (they reach each other directly, as the policy allows).
        cmds.push(rule("output", expr.clone(), Some(&f.vm_id)));
        let mut from_outside = vec![matches(meta("iifname"), "!=", json!(d.bridge))];
        from_outside.extend(expr);
        cmds.push(rule("prerouting", from_outside, Some(&f.vm_id)));
    }
    cmds.extend(host_rules(d));
    cmds.extend(bridge_rules(d));
    json!({ "nftables": cmds })
}

/// `ip hatch` filter chains: what guests may reach at the IP layer.
fn host_rules(d: &Desired) -> Vec<Value> {
    let from_guests = || matches(meta("iifname"), "==", json!(d.bridge));
    let udp = |port: u16| {
        matches(
            json!({ "payload": { "protocol": "udp", "field": "dport" } }),
            "==",
            json!(port),
        )
    };
    let tcp = |port: u16| {
        matches(
            json!({ "payload": { "protocol": "tcp", "field": "dport" } }),
            "==",
            json!(port),
        )
    };
    let to_bridge = || matches(ip_field("daddr"), "==", json!(d.bridge_ip));
    let mut cmds = vec![
        chain("input", "filter", "input", 0),
        // Answers to what the host started (the proxy, SSH, DNS replies'
        // ICMP errors): the guest cannot open these, only answer them.
        rule(
            "input",
            vec![
                from_guests(),
                matches(
                    json!({ "ct": { "key": "state" } }),
                    "in",
                    json!(["established", "related"]),
                ),
                json!({ "accept": null }),
            ],
            None,
        ),
        rule(
            "input",
            vec![
                from_guests(),
                matches(
                    ip_field("daddr"),
                    "==",
                    set([d.bridge_ip.as_str(), "255.255.255.255"]),
                ),
                udp(67),
                json!({ "accept": null }),
            ],
            Some("DHCP"),
        ),
        rule(
            "input",
            vec![
                from_guests(),
                to_bridge(),
                udp(53),
                json!({ "accept": null }),
            ],
            Some("DNS"),
        ),
        rule(
            "input",
            vec![
                from_guests(),
                to_bridge(),
                tcp(53),
                json!({ "accept": null }),
            ],
            Some("DNS"),
        ),
        // Everything else a guest sends to the host: its other addresses,
        // its services, and 127.0.0.0/8, which the bridge's route_localnet
        // would otherwise deliver.
        rule(
            "input",
            vec![from_guests(), json!({ "drop": null })],
            Some("guests reach no other host service"),
        ),
    ];
    if d.guest_to_guest == GuestToGuest::All {
        return cmds;
    }
    // A guest may send to another guest's address through the host (to
    // the gateway's MAC), and br_netfilter shows bridged IPv4 to this hook
    // too: both come in and go out on the bridge. The bridge table has
    // already checked bridged frames, and addresses are pinned there, so
    // the source address says who sent it.
    cmds.push(chain("forward", "filter", "forward", 0));
    let hairpin = || {
        vec![
            matches(meta("iifname"), "==", json!(d.bridge)),
            matches(meta("oifname"), "==", json!(d.bridge)),
        ]
    };
    let mut flood = hairpin();
    flood.push(matches(
        meta("pkttype"),
        "==",
        set(["broadcast", "multicast"]),
    ));
    flood.push(json!({ "accept": null }));
    cmds.push(rule(
        "forward",
        flood,
        Some("bridged floods, checked per port"),
    ));
    for group in peer_groups(d) {
        let ips = || set(group.iter().map(|g| g.ip.as_str()));
        let mut expr = hairpin();
        expr.push(matches(ip_field("saddr"), "==", ips()));
        expr.push(matches(ip_field("daddr"), "==", ips()));
        expr.push(json!({ "accept": null }));
        cmds.push(rule("forward", expr, Some("same owner")));
    }
    let mut drop = hairpin();
    drop.push(json!({ "drop": null }));
    cmds.push(rule("forward", drop, Some("guest to guest")));
    cmds
}

/// `bridge hatch`: each guest's port may only send from its VM's MAC and
/// address; frames between guests' ports follow the guest-to-guest policy.
fn bridge_rules(d: &Desired) -> Vec<Value> {
    let mut cmds = vec![
        json!({ "add": { "table": { "family": "bridge", "name": TABLE } } }),
        json!({ "delete": { "table": { "family": "bridge", "name": TABLE } } }),
        json!({ "add": { "table": { "family": "bridge", "name": TABLE } } }),
        // prerouting sees every frame a port sends, before the bridge learns
        // its source MAC and before it is forwarded or delivered to the host.
        base_chain("bridge", "prerouting", "filter", "prerouting", -200),
        base_chain("bridge", "forward", "filter", "forward", -200),
    ];
    let accept = || json!({ "accept": null });
    let drop = || json!({ "drop": null });
    let mut verdicts = vec![];
    for g in &d.guests {
        let c = g.vm_id.as_str();
        cmds.push(json!({ "add": { "chain": {
            "family": "bridge", "table": TABLE, "name": c
        } } }));
        let ether = |field: &str| json!({ "payload": { "protocol": "ether", "field": field } });
        let arp = |field: &str| json!({ "payload": { "protocol": "arp", "field": field } });
        cmds.push(bridge_rule(
            c,
            vec![matches(ether("saddr"), "!=", json!(g.mac)), drop()],
            Some("another MAC"),
        ));
        // ARP only for its own address; 0.0.0.0 is an address probe
        // (RFC 5227), which claims nothing.
        cmds.push(bridge_rule(
            c,
            vec![
                matches(arp("saddr ether"), "==", json!(g.mac)),
                matches(arp("saddr ip"), "==", set([g.ip.as_str(), "0.0.0.0"])),
                accept(),
            ],
            None,
        ));
        cmds.push(bridge_rule(
            c,
            vec![matches(ip_field("saddr"), "==", json!(g.ip)), accept()],
            None,
        ));
        // A DHCP client has no address yet.
        cmds.push(bridge_rule(
            c,
            vec![
                matches(ip_field("saddr"), "==", json!("0.0.0.0")),
                matches(ip_field("daddr"), "==", json!("255.255.255.255")),
                matches(
                    json!({ "payload": { "protocol": "udp", "field": "sport" } }),
                    "==",
                    json!(68),
                ),
                matches(
                    json!({ "payload": { "protocol": "udp", "field": "dport" } }),
                    "==",
                    json!(67),
                ),
                accept(),
            ],
            Some("DHCP discover"),
        ));
        // Spoofed ARP or IPv4, IPv6, VLAN tags and every other ethertype.
        cmds.push(bridge_rule(c, vec![drop()], None));
        for port in &g.ports {
            verdicts.push(json!([port, { "jump": { "target": c } }]));
        }
    }
    if !verdicts.is_empty() {
        cmds.push(bridge_rule(
            "prerouting",
            vec![json!({ "vmap": { "key": meta("iifname"), "data": { "set": verdicts } } })],
            None,
        ));
    }
    // A guest's port that no VM holds (yet, or any more) sends nothing.
    for prefix in ["ht*", "hv*"] {
        cmds.push(bridge_rule(
            "prerouting",
            vec![matches(meta("iifname"), "==", json!(prefix)), drop()],
            Some("no VM holds this port"),
        ));
    }
    if d.guest_to_guest == GuestToGuest::All || d.guests.is_empty() {
        return cmds;
    }
    let ports = |gs: &[&Guest]| set(gs.iter().flat_map(|g| g.ports.iter().map(String::as_str)));
    for group in peer_groups(d) {
        cmds.push(bridge_rule(
            "forward",
            vec![
                matches(meta("iifname"), "==", ports(&group)),
                matches(meta("oifname"), "==", ports(&group)),
                accept(),
            ],
            Some("same owner"),
        ));
    }
    let all: Vec<&Guest> = d.guests.iter().collect();
    cmds.push(bridge_rule(
        "forward",
        vec![
            matches(meta("iifname"), "==", ports(&all)),
            matches(meta("oifname"), "==", ports(&all)),
            drop(),
        ],
        Some("guest to guest"),
    ));
    cmds
}

pub(super) fn apply(doc: &Value) -> Result<(), String> {
    let typed: Nftables =
        serde_json::from_value(doc.clone()).map_err(|e| format!("nftables document: {e}"))?;
    nftables::helper::apply_ruleset(&typed).map_err(|e| format!("nft: {e}"))
}

/// Makes the kernel's `ip hatch` table equal to `d`.
pub async fn sync(d: &Desired) -> Result<(), String> {
    let doc = ruleset(d);
    tokio::task::spawn_blocking(move || apply(&doc))
        .await
        .map_err(|e| e.to_string())?
}

/// Removes the tables and everything in them.
pub async fn remove() -> Result<(), String> {
    let doc = json!({ "nftables": [
        { "add": { "table": { "family": "ip", "name": TABLE } } },
        { "delete": { "table": { "family": "ip", "name": TABLE } } },
        { "add": { "table": { "family": "bridge", "name": TABLE } } },
        { "delete": { "table": { "family": "bridge", "name": TABLE } } },
    ] });
    tokio::task::spawn_blocking(move || apply(&doc))
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(id: &str, owner: &str, last: u8) -> Guest {
        Guest {
            vm_id: format!("vm_{id}"),
            owner_id: owner.into(),
            ports: vec![format!("ht{id}"), format!("hv{id}")],
            mac: format!("02:fc:ac:10:00:{last:02x}"),
            ip: format!("172.16.0.{last}"),
        }
    }

    fn desired(sources: &[&str]) -> Desired {
        Desired {
            bridge: "hatch0".into(),
            bridge_ip: "172.16.0.1".into(),
            guest_cidr: "172.16.0.0/24".into(),
            allowed_sources: sources.iter().map(|s| s.to_string()).collect(),
            forwards: vec![Forward {
                vm_id: "vm_a".into(),
                host_port: 16000,
                guest_ip: "172.16.0.10".into(),
                guest_port: 22,
            }],
            guests: vec![
                guest("a", "alice", 10),
                guest("b", "bob", 11),
                guest("c", "alice", 12),
            ],
            guest_to_guest: GuestToGuest::Owner,
        }
    }

    /// The `expr` lists of the rules in one chain.
    fn rules_of(doc: &Value, family: &str, chain: &str) -> Vec<Value> {
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["family"] == family && r["chain"] == chain)
            .map(|r| r["expr"].clone())
            .collect()
    }

    #[test]
    fn the_document_parses_as_nftables_json() {
        let doc = ruleset(&desired(&["10.0.0.0/8", "192.168.1.7/32"]));
        let typed: Nftables = serde_json::from_value(doc.clone()).expect("valid nftables JSON");
        assert!(typed.objects.len() > 10);
        let text = doc.to_string();
        assert!(
            text.contains("\"dport\"") && text.contains("16000") && text.contains("172.16.0.10")
        );
        assert!(text.contains("192.168.1.7"), "source restriction present");
    }

    #[test]
    fn any_source_needs_no_source_match() {
        let doc = ruleset(&desired(&["0.0.0.0/0"]));
        let forwards = Value::from(rules_of(&doc, "ip", "prerouting"));
        assert!(!forwards.to_string().contains("\"set\""));
        let none = Desired {
            forwards: vec![],
            ..desired(&["0.0.0.0/0"])
        };
        assert!(!ruleset(&none).to_string().contains("dnat"));
    }

    #[test]
    fn every_port_of_a_guest_jumps_to_its_pin() {
        let doc = ruleset(&desired(&["0.0.0.0/0"]));
        let pre = rules_of(&doc, "bridge", "prerouting");
        let vmap = pre[0][0]["vmap"]["data"]["set"].to_string();
        for (port, chain) in [("hta", "vm_a"), ("hva", "vm_a"), ("htb", "vm_b")] {
            assert!(
                vmap.contains(&format!(
                    "[\"{port}\",{{\"jump\":{{\"target\":\"{chain}\"}}}}]"
                )),
                "{vmap}"
            );
        }
        // Ports no VM holds drop all; a pin ends in a drop too.
        assert_eq!(pre.len(), 3);
        let pin = rules_of(&doc, "bridge", "vm_b");
        assert!(pin[0].to_string().contains("02:fc:ac:10:00:0b"));
        assert_eq!(pin.last().unwrap(), &json!([{ "drop": null }]));
    }

    #[test]
    fn the_policy_decides_which_guests_meet() {
        let forward = |p: GuestToGuest| {
            let doc = ruleset(&Desired {
                guest_to_guest: p,
                ..desired(&["0.0.0.0/0"])
            });
            (
                Value::from(rules_of(&doc, "bridge", "forward")).to_string(),
                Value::from(rules_of(&doc, "ip", "forward")).to_string(),
            )
        };
        let (l2, l3) = forward(GuestToGuest::Owner);
        // alice's two guests form the only group; then everything else drops.
        assert!(l2.contains(r#"{"set":["hta","hva","htc","hvc"]}"#), "{l2}");
        assert!(
            l3.contains(r#"{"set":["172.16.0.10","172.16.0.12"]}"#),
            "{l3}"
        );
        assert!(!l3.contains("172.16.0.11"), "{l3}");
        assert!(l2.ends_with(r#"{"drop":null}]]"#), "{l2}");
        assert!(l3.ends_with(r#"{"drop":null}]]"#), "{l3}");
        let (l2, l3) = forward(GuestToGuest::None);
        assert!(!l2.contains("accept") && l2.contains("drop"), "{l2}");
        assert!(!l3.contains("172.16.0.10"), "{l3}");
        let (l2, l3) = forward(GuestToGuest::All);
        assert_eq!((l2.as_str(), l3.as_str()), ("[]", "[]"));
    }

    #[test]
    fn guests_reach_only_dhcp_and_dns_on_the_host() {
        let doc = ruleset(&desired(&["0.0.0.0/0"]));
        let input = rules_of(&doc, "ip", "input");
        let last = input.last().unwrap().to_string();
        assert_eq!(
            last,
            r#"[{"match":{"left":{"meta":{"key":"iifname"}},"op":"==","right":"hatch0"}},{"drop":null}]"#
        );
        // Before it: answers, DHCP and DNS (UDP and TCP), nothing else.
        assert_eq!(input.len(), 5);
        let accepted = Value::from(input[1..4].to_vec()).to_string();
        for port in [r#""right":67"#, r#""right":53"#] {
            assert!(accepted.contains(port), "{accepted}");
        }
        // Forwards are for the host and other hosts, not for guests.
        for r in rules_of(&doc, "ip", "prerouting") {
            assert!(
                r[0].to_string().contains(r#""op":"!=","right":"hatch0""#),
                "{r}"
            );
        }
    }

    #[test]
    fn the_setting_parses() {
        assert_eq!("owner".parse(), Ok(GuestToGuest::Owner));
        assert_eq!(" NONE ".parse(), Ok(GuestToGuest::None));
        assert_eq!("all".parse(), Ok(GuestToGuest::All));
        assert!("some".parse::<GuestToGuest>().is_err());
    }
}
