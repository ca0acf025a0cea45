//! Names to ids: wherever the CLI takes a VM, snapshot, image, template or route, a name (or an id's unique start) does too.

use super::client::{CliError, Client};
use serde_json::Value;

/// One kind of object the CLI resolves.
pub struct Kind {
    /// For messages: "VM", "snapshot".
    pub what: &'static str,
    /// Its ids' prefix, with the underscore.
    pub prefix: &'static str,
    /// The field that names it.
    pub name_field: &'static str,
}

pub const VM: Kind = Kind {
    what: "VM",
    prefix: "vm_",
    name_field: "name",
};
pub const SNAPSHOT: Kind = Kind {
    what: "snapshot",
    prefix: "snap_",
    name_field: "name",
};
pub const IMAGE: Kind = Kind {
    what: "image",
    prefix: "img_",
    name_field: "name",
};
pub const TEMPLATE: Kind = Kind {
    what: "template",
    prefix: "tpl_",
    name_field: "name",
};
pub const ROUTE: Kind = Kind {
    what: "route",
    prefix: "rt_",
    name_field: "subdomain",
};

/// Whether `arg` has the shape of one of our ids of this kind (prefix + 12
/// of `[a-z0-9]`, or `img_default`): then it is used as is, without a listing.
pub fn is_id(kind: &Kind, arg: &str) -> bool {
    let Some(rest) = arg.strip_prefix(kind.prefix) else {
        return false;
    };
    (rest.len() == 12
        && rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        || arg == "img_default"
}

/// Picks the one object `arg` means among `items`: an exact name, else the
/// one id that starts with `arg`. Several are an error naming them all.
pub fn pick(kind: &Kind, arg: &str, items: &[Value]) -> Result<String, CliError> {
    let id = |v: &Value| v["id"].as_str().unwrap_or_default().to_string();
    if let Some(v) = items.iter().find(|v| v["id"] == arg) {
        return Ok(id(v));
    }
    let by_name: Vec<&Value> = items.iter().filter(|v| v[kind.name_field] == arg).collect();
    let candidates = if !by_name.is_empty() {
        by_name
    } else if arg.len() > kind.prefix.len() && arg.starts_with(kind.prefix) {
        items
            .iter()
            .filter(|v| v["id"].as_str().is_some_and(|i| i.starts_with(arg)))
            .collect()
    } else {
        vec![]
    };
    match candidates.as_slice() {
        [one] => Ok(id(one)),
        [] => Err(CliError::NotFound(format!(
            "no {} named {arg:?} (nor one whose id is or starts with it)",
            kind.what
        ))),
        many => Err(CliError::Other(format!(
            "{arg:?} is ambiguous: it could be the {} {}; give an id",
            kind.what,
            many.iter()
                .map(|v| describe(v, kind))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// "snap_abc (pre-upgrade, of vm_xyz)": enough to choose between candidates.
fn describe(v: &Value, kind: &Kind) -> String {
    let mut extra = vec![];
    if let Some(n) = v[kind.name_field].as_str() {
        extra.push(n.to_string());
    }
    if let Some(vm) = v["source_instance_id"].as_str() {
        extra.push(format!("of {vm}"));
    }
    let id = v["id"].as_str().unwrap_or_default();
    if extra.is_empty() {
        id.to_string()
    } else {
        format!("{id} ({})", extra.join(", "))
    }
}

/// The id `arg` means among what `list_path` lists (an id-shaped `arg` as is).
pub async fn resolve(
    client: &Client,
    kind: &Kind,
    arg: &str,
    list_path: &str,
) -> Result<String, CliError> {
    if is_id(kind, arg) {
        return Ok(arg.to_string());
    }
    let answer = client.get(list_path).await?;
    let items = answer
        .json()
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    pick(kind, arg, items)
}

pub async fn vm(client: &Client, arg: &str) -> Result<String, CliError> {
    resolve(client, &VM, arg, "/vms").await
}

pub async fn snapshot(client: &Client, arg: &str) -> Result<String, CliError> {
    resolve(client, &SNAPSHOT, arg, "/snapshots").await
}

pub async fn image(client: &Client, arg: &str) -> Result<String, CliError> {
    resolve(client, &IMAGE, arg, "/images").await
}

pub async fn template(client: &Client, arg: &str) -> Result<String, CliError> {
    resolve(client, &TEMPLATE, arg, "/templates").await
}

pub async fn route(client: &Client, vm_id: &str, arg: &str) -> Result<String, CliError> {
    resolve(client, &ROUTE, arg, &format!("/vms/{vm_id}/routes")).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vms() -> Vec<Value> {
        vec![
            json!({"id": "vm_aaaaaaaaaaa1", "name": "web"}),
            json!({"id": "vm_aaaaaaaaaaa2", "name": null}),
            json!({"id": "vm_bbbbbbbbbbbb", "name": "db"}),
        ]
    }

    #[test]
    fn a_name_or_a_unique_id_start_picks_one() {
        assert_eq!(pick(&VM, "web", &vms()).unwrap(), "vm_aaaaaaaaaaa1");
        assert_eq!(pick(&VM, "vm_b", &vms()).unwrap(), "vm_bbbbbbbbbbbb");
        assert_eq!(
            pick(&VM, "vm_aaaaaaaaaaa2", &vms()).unwrap(),
            "vm_aaaaaaaaaaa2"
        );
    }

    #[test]
    fn ambiguity_names_the_candidates_and_nothing_is_not_found() {
        let e = pick(&VM, "vm_a", &vms()).unwrap_err();
        assert!(matches!(e, CliError::Other(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("vm_aaaaaaaaaaa1 (web)") && text.contains("vm_aaaaaaaaaaa2"),
            "{text}"
        );
        let e = pick(&VM, "nope", &vms()).unwrap_err();
        assert!(matches!(e, CliError::NotFound(_)), "{e:?}");
        // The bare prefix matches no id: it is not a way to pick "any".
        assert!(matches!(
            pick(&VM, "vm_", &vms()).unwrap_err(),
            CliError::NotFound(_)
        ));
        let snaps = [
            json!({"id": "snap_aaaaaaaaaaaa", "name": "pre", "source_instance_id": "vm_1"}),
            json!({"id": "snap_bbbbbbbbbbbb", "name": "pre", "source_instance_id": "vm_2"}),
        ];
        let text = pick(&SNAPSHOT, "pre", &snaps).unwrap_err().to_string();
        assert!(
            text.contains("snap_aaaaaaaaaaaa (pre, of vm_1)")
                && text.contains("snap_bbbbbbbbbbbb (pre, of vm_2)"),
            "{text}"
        );
    }

    #[test]
    fn id_shapes() {
        assert!(is_id(&VM, "vm_k3j9x0a1b2c3"));
        assert!(!is_id(&VM, "vm_k3j9"));
        assert!(!is_id(&VM, "web"));
        assert!(is_id(&IMAGE, "img_default"));
        assert!(!is_id(&VM, "img_default"));
    }
}
