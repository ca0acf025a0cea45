//! The daemon's SSH certificate authority (one ed25519 key in the data dir
//! that signs short-lived user certificates scoped to one VM) and its client.

mod ca;
pub mod client;
mod keys;

pub use ca::{Ca, CaError, SignedCert, CA_FILE, CA_PUB_FILE};
pub use keys::{parse_user_key, KeyError, MAX_PUBLIC_KEY_LEN};

/// The guest user a certificate logs in as (the Hatch product's name).
pub const GUEST_USER: &str = "agent";
