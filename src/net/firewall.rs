//! Every firewall rule hatch needs lives in one nftables table, `ip hatch`,
//! which is rebuilt as a whole in a single atomic transaction from the
//! desired state. Nothing is edited in place, so nothing can leak: listing
//! the table shows exactly what hatch wants now, and deleting it removes all.

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

/// What the table should hold.
#[derive(Debug, Clone)]
pub struct Desired {
    pub bridge: String,
    /// The guests' network, e.g. `172.16.0.0/24`.
    pub guest_cidr: String,
    /// Sources allowed to use the SSH forwards (`0.0.0.0/0` for any).
    pub allowed_sources: Vec<String>,
    pub forwards: Vec<Forward>,
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

fn chain(name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({ "add": { "chain": {
        "family": "ip", "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept"
    } } })
}

fn rule(chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
    let mut r = json!({ "family": "ip", "table": TABLE, "chain": chain, "expr": expr });
    if let Some(c) = comment {
        r["comment"] = json!(c);
    }
    json!({ "add": { "rule": r } })
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
        // prerouting: from other hosts; output: from this host itself.
        for c in ["prerouting", "output"] {
            cmds.push(rule(c, expr.clone(), Some(&f.vm_id)));
        }
    }
    json!({ "nftables": cmds })
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

/// Removes the table and everything in it.
pub async fn remove() -> Result<(), String> {
    let doc = json!({ "nftables": [
        { "add": { "table": { "family": "ip", "name": TABLE } } },
        { "delete": { "table": { "family": "ip", "name": TABLE } } },
    ] });
    tokio::task::spawn_blocking(move || apply(&doc))
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(sources: &[&str]) -> Desired {
        Desired {
            bridge: "hatch0".into(),
            guest_cidr: "172.16.0.0/24".into(),
            allowed_sources: sources.iter().map(|s| s.to_string()).collect(),
            forwards: vec![Forward {
                vm_id: "vm_a".into(),
                host_port: 16000,
                guest_ip: "172.16.0.10".into(),
                guest_port: 22,
            }],
        }
    }

    #[test]
    fn the_document_parses_as_nftables_json() {
        let doc = ruleset(&desired(&["10.0.0.0/8", "192.168.1.7/32"]));
        let typed: Nftables = serde_json::from_value(doc.clone()).expect("valid nftables JSON");
        // 3 table commands, 3 chains, 2 NAT rules, 2 rules per forward.
        assert_eq!(typed.objects.len(), 10);
        let text = doc.to_string();
        assert!(
            text.contains("\"dport\"") && text.contains("16000") && text.contains("172.16.0.10")
        );
        assert!(text.contains("192.168.1.7"), "source restriction present");
    }

    #[test]
    fn any_source_needs_no_source_match() {
        let text = ruleset(&desired(&["0.0.0.0/0"])).to_string();
        assert!(!text.contains("\"set\""));
        let none = Desired {
            forwards: vec![],
            ..desired(&["0.0.0.0/0"])
        };
        assert!(!ruleset(&none).to_string().contains("dnat"));
    }
}
