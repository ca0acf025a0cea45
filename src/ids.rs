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
    format!("{prefix}_{}", random_string(12))
}

/// Does `id` look like one of ours with this prefix? Used to fail fast on garbage.
pub fn looks_like(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
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
    }
}
