//! Prefixed random identifiers (`vm_`, `img_`, `tpl_`, ...) and API key material.

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Random lowercase alphanumeric string of `len` characters.
pub fn random_string(len: usize) -> String {
    let mut buf = vec![0u8; len];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    // 252 is the largest multiple of 36 below 256: rejecting bytes above it keeps the choice uniform.
    let mut out = String::with_capacity(len);
    let mut pool = buf;
    while out.len() < len {
        for b in &pool {
            if *b < 252 && out.len() < len {
                out.push(ALPHABET[(*b % 36) as usize] as char);
            }
        }
        pool = vec![0u8; len];
        getrandom::fill(&mut pool).expect("the OS random source failed");
    }
    out
}

/// A new id such as `vm_k3j9x0a1b2c3`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_string(ID_LEN))
}

/// Length of the random part of an id.
const ID_LEN: usize = 12;

/// Could `id` be one we made with this prefix (`prefix_` + 12 of our
/// characters)? Lets the API answer 404 for garbage without a lookup.
pub fn looks_like(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|rest| rest.len() == ID_LEN && rest.bytes().all(|b| ALPHABET.contains(&b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_are_distinct() {
        let a = new_id("vm");
        let b = new_id("vm");
        assert!(a.starts_with("vm_") && a.len() == 15, "{a}");
        assert_ne!(a, b);
        assert!(a[3..].bytes().all(|c| ALPHABET.contains(&c)));
        assert!(looks_like(&a, "vm"));
        assert!(!looks_like(&a, "img"));
        assert!(!looks_like("vm_", "vm"));
        assert!(
            !looks_like("vm_K3J9X0A1B2C3", "vm"),
            "upper case is not ours"
        );
        assert!(!looks_like("vm_k3j9x0a1b2c", "vm"), "one short");
        assert!(!looks_like(&format!("{a}x"), "vm"), "one long");
        assert!(!looks_like("vm_k3j9x0a1b2-_", "vm"));
    }
}
