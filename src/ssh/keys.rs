//! The public key a caller asks to have signed: one OpenSSH `authorized_keys`
//! style line of a kind that stock OpenSSH accepts with a certificate.

use ssh_key::public::KeyData;
use ssh_key::PublicKey;

/// The longest `public_key` taken: a 16384-bit RSA key with a long comment
/// is about 3 KiB, so 8 KiB leaves room and refuses junk early.
pub const MAX_PUBLIC_KEY_LEN: usize = 8 * 1024;

/// The smallest RSA modulus OpenSSH's sshd accepts (its `RequiredRSASize`).
const MIN_RSA_BITS: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("public_key is required (an OpenSSH public key line such as \"ssh-ed25519 AAAA... me@host\")")]
    Missing,
    #[error("public_key is {0} bytes; at most {MAX_PUBLIC_KEY_LEN} are taken")]
    TooLong(usize),
    #[error("public_key must be one key on one line")]
    MultipleLines,
    #[error("public_key is not an OpenSSH public key: {0}")]
    Invalid(String),
    #[error("public_key of type {0} cannot be signed (use ed25519, ecdsa or rsa)")]
    Unsupported(String),
    #[error("public_key is an RSA key of {0} bits; OpenSSH needs at least {MIN_RSA_BITS}")]
    WeakRsa(usize),
}

/// Parses and checks the caller's key; what comes back can be certified.
pub fn parse_user_key(text: &str) -> Result<PublicKey, KeyError> {
    if text.len() > MAX_PUBLIC_KEY_LEN {
        return Err(KeyError::TooLong(text.len()));
    }
    let line = text.trim();
    if line.is_empty() {
        return Err(KeyError::Missing);
    }
    if line.contains(['\n', '\r']) {
        return Err(KeyError::MultipleLines);
    }
    let key = PublicKey::from_openssh(line).map_err(|e| KeyError::Invalid(e.to_string()))?;
    match key.key_data() {
        KeyData::Ed25519(_)
        | KeyData::Ecdsa(_)
        | KeyData::SkEd25519(_)
        | KeyData::SkEcdsaSha2NistP256(_) => Ok(key),
        KeyData::Rsa(rsa) => {
            let bits = rsa
                .n
                .as_positive_bytes()
                .map(|b| b.len() * 8 - b[0].leading_zeros() as usize)
                .unwrap_or(0);
            if bits < MIN_RSA_BITS {
                return Err(KeyError::WeakRsa(bits));
            }
            Ok(key)
        }
        // DSA is off in OpenSSH since 7.0; anything else is a type we do not know.
        other => Err(KeyError::Unsupported(other.algorithm().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHd0B0Zw5tYQnRbbQpBuuM3m2IFgq/jFNK4pRk0vMpUX me@host";

    #[test]
    fn takes_one_ed25519_line() {
        let key = parse_user_key(&format!("  {ED25519}\n")).unwrap();
        assert_eq!(key.algorithm(), ssh_key::Algorithm::Ed25519);
        assert_eq!(key.comment(), "me@host");
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBAQ0LdoCUzXvVTWcJVPYMKysJ561yWw3Sm1rpS3V1GMzgjGuwSHxEdNHGzKDMU6TqQmLeI7Tjlc6OMrLgHoCB7k= ec";
        assert!(parse_user_key(ecdsa).is_ok());
        let rsa2048 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDCpmU+dpkdQpjHsL1U2EpigcZRvQyrRcELfpJW/CcVw7JTNL3zQPdD0gp/GRYIReX2Up6ogkSiwxKAb9cXem0/72rzjpXdW71riFmG7QlEdp+mIgfgmhCKC/dk9c8F6Ao0w1jhSIggH7x33aGCto0PtmP9SINkFoa0b3q95vm6PT3NMqGJKuLU2kZZpfP2WaqV0KyxgBHvAl7nbY8Y19KUvYICeZY9Dl9oSnj7W/R4unEdCZzfGj49Ohu36B8WIjIIRg7KoOvmMAsO/57o9Os0NIc9v7kA1tK/mhHxJa4CjbrEjRoZj5NSVNMKRzvlFTPPi2bHtVYECAy3vOmc8c7/ rsa";
        assert!(parse_user_key(rsa2048).is_ok());
    }

    #[test]
    fn refuses_junk() {
        assert_eq!(parse_user_key(""), Err(KeyError::Missing));
        assert_eq!(parse_user_key(" \n "), Err(KeyError::Missing));
        assert!(matches!(
            parse_user_key("ssh-ed25519 not-base64!"),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(parse_user_key("hello"), Err(KeyError::Invalid(_))));
        assert_eq!(
            parse_user_key(&format!("{ED25519}\n{ED25519}")),
            Err(KeyError::MultipleLines)
        );
        let long = format!("{ED25519} {}", "x".repeat(MAX_PUBLIC_KEY_LEN));
        assert_eq!(parse_user_key(&long), Err(KeyError::TooLong(long.len())));
    }

    #[test]
    fn refuses_dsa_and_small_rsa() {
        // A 512-bit RSA key, written out by hand (ssh-keygen no longer makes one).
        let rsa512 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAQQCo01uoXgJ/Ii3fyHjp6pavHUMoWUcq+2Y21EcQdbF4ItjUk8DWFtuitEdxgqS6h+ufjUAtrw8+FnfjUoUr922Z small";
        assert_eq!(parse_user_key(rsa512), Err(KeyError::WeakRsa(512)));
        let dsa = "ssh-dss AAAAB3NzaC1kc3MAAACBAI628RW/8HqiF9Wv4TpGqjNJ55IrbzsRDzlgcZrDojYixW8PsEYy4RShZ8h2n7n2NXOhaoc3+ZQ8nYfhFNOwjQpCreax/CKdCg5OOyTYJWtOIlU2LT74YlxjwZ4NC5L0htvLEoxd6yt/zuKTAwyVZNHco1Zv63kXGTw9N2DAtKdFAAAAFQD1KQRaHwIqe2IWhKfruJyNmNsirwAAAIAxuBQwrE4x0jeNUug1nnriTdiS4H9BO0XYCuSx5nERied4yMmRZ5RyhSdMtwPEb954fE4t1quBVHLcpDq4okCPxnFcAMYm4rn3IZpvGiWsU9Qfzh1+mpe+dr+2VEI1/fqaVQYX1ZtFtqJPlOr6Z90AXzFTZ5kDZvW/hJvND6jQJQAAAIBe3LPbA+ZJDUv2mdJvfH8g8zQHWRinOoEQoZrXxGRzLSPZ4jHN3Xbs7sJdW6agI4IOHTSmRdHua/yJukN6pHanBlMfz+s6Is9jObbDe5N6p2NRquc7YbH2rZG7vZGaNT+wincDg/zaIl589ujpf/GXJX+YCWB6Emhvp+X89H0pYw== d";
        assert_eq!(
            parse_user_key(dsa),
            Err(KeyError::Unsupported("ssh-dss".into()))
        );
    }
}
