//! Peer authentication primitives and duplicate-connection resolution.

use crate::NONCE_LEN;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::Read;

type HmacSha256 = Hmac<Sha256>;

/// Domain separation: a MAC computed for this purpose can never be valid
/// for another use of the same secret (or a later version of this one).
const AUTH_CONTEXT: &[u8] = b"tandem-auth-v1\0";

/// An HMAC-SHA256 instance keyed with `secret`.
///
/// The RFC 2104 key preparation (hash a key longer than the 64-byte block,
/// zero-pad a shorter one) is done here, so the key handed to `hmac` is
/// always exactly one block and construction has no failure path to
/// handle. The RFC 4231 test vectors below pin that this equals HMAC.
fn keyed(secret: &[u8]) -> HmacSha256 {
    let mut block = hmac::digest::Key::<HmacSha256>::default();
    if secret.len() > block.len() {
        let digest = Sha256::digest(secret);
        for (b, d) in block.iter_mut().zip(digest.iter()) {
            *b = *d;
        }
    } else {
        for (b, s) in block.iter_mut().zip(secret) {
            *b = *s;
        }
    }
    <HmacSha256 as hmac::digest::KeyInit>::new(&block)
}

fn auth_input(mac: &mut HmacSha256, resource: &str, responder_node: &str, nonce: &[u8; NONCE_LEN]) {
    // NUL separators keep ("ab", "c") and ("a", "bc") apart; names are
    // UTF-8 from configuration and never contain NUL.
    mac.update(AUTH_CONTEXT);
    mac.update(resource.as_bytes());
    mac.update(&[0]);
    mac.update(responder_node.as_bytes());
    mac.update(&[0]);
    mac.update(nonce);
}

/// HMAC-SHA256(secret, "tandem-auth-v1\0" || resource || 0 || responder_node || 0 || nonce)
///
/// The responder's own name is part of the input so a peer cannot pass by
/// reflecting our challenge back at us and replaying our answer: that
/// answer names us, not it.
pub fn auth_mac(
    secret: &[u8],
    resource: &str,
    responder_node: &str,
    nonce: &[u8; NONCE_LEN],
) -> [u8; 32] {
    let mut mac = keyed(secret);
    auth_input(&mut mac, resource, responder_node, nonce);
    mac.finalize().into_bytes().into()
}

/// Constant-time verification of a response made with [`auth_mac`]:
/// the time taken does not depend on how many bytes of `mac` are right.
pub fn auth_verify(
    secret: &[u8],
    resource: &str,
    responder_node: &str,
    nonce: &[u8; NONCE_LEN],
    mac: &[u8; 32],
) -> bool {
    let mut m = keyed(secret);
    auth_input(&mut m, resource, responder_node, nonce);
    m.verify_slice(mac).is_ok()
}

/// Fresh nonce from /dev/urandom (getrandom via std: read 32 bytes from /dev/urandom; return io::Result).
///
/// /dev/urandom never blocks once the kernel's pool is initialised (long
/// before a daemon starts), so reading it inside an async handshake is fine.
pub fn new_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

/// Deterministic duplicate-connection resolution: when both nodes connected to each other at once,
/// both keep the connection initiated by the node whose name sorts first; returns true if `me` should keep its outgoing one.
///
/// Names compare bytewise (Rust's `str` order), which both nodes compute
/// identically whatever their locale. Equal names (a misconfiguration the
/// handshake also rejects) keep neither outgoing connection.
pub fn keep_outgoing(me: &str, peer: &str) -> bool {
    me < peer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Plain HMAC-SHA256 through our key preparation.
    fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut m = keyed(key);
        m.update(data);
        m.finalize().into_bytes().to_vec()
    }

    #[test]
    fn key_preparation_matches_rfc4231() {
        // Test cases 1, 2, 6 and 7: short keys, and 131-byte keys that
        // must be hashed first.
        assert_eq!(
            hmac(&[0x0b; 20], b"Hi There"),
            hex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        );
        assert_eq!(
            hmac(b"Jefe", b"what do ya want for nothing?"),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
        assert_eq!(
            hmac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            hex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54")
        );
        assert_eq!(
            hmac(
                &[0xaa; 131],
                b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm."
            ),
            hex("9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2")
        );
        // And agrees with hmac's own key handling for a block-sized key.
        let mut direct = <HmacSha256 as Mac>::new_from_slice(&[3; 64]).unwrap();
        direct.update(b"x");
        assert_eq!(
            hmac(&[3; 64], b"x"),
            direct.finalize().into_bytes().to_vec()
        );
    }

    #[test]
    fn mac_binds_secret_resource_responder_and_nonce() {
        let n = [1u8; NONCE_LEN];
        let mac = auth_mac(b"s3cret", "r0", "beta", &n);
        assert!(auth_verify(b"s3cret", "r0", "beta", &n, &mac));
        assert!(!auth_verify(b"other", "r0", "beta", &n, &mac));
        assert!(!auth_verify(b"s3cret", "r1", "beta", &n, &mac));
        assert!(!auth_verify(b"s3cret", "r0", "alpha", &n, &mac));
        assert!(!auth_verify(b"s3cret", "r0", "beta", &[2; NONCE_LEN], &mac));
        // The separator keeps the resource/node boundary significant.
        assert_ne!(auth_mac(b"s", "ab", "c", &n), auth_mac(b"s", "a", "bc", &n));
        let mut bad = mac;
        bad[31] ^= 1;
        assert!(!auth_verify(b"s3cret", "r0", "beta", &n, &bad));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(new_nonce().unwrap(), new_nonce().unwrap());
    }

    #[test]
    fn exactly_one_side_keeps_its_outgoing_connection() {
        assert!(keep_outgoing("alpha", "beta"));
        assert!(!keep_outgoing("beta", "alpha"));
        assert!(!keep_outgoing("alpha", "alpha"));
        for (a, b) in [("node10", "node9"), ("Z", "a"), ("é", "e")] {
            assert_ne!(keep_outgoing(a, b), keep_outgoing(b, a));
        }
    }
}
