//! Tokens as the farm keeps them: random, stored only as SHA-256 hashes, compared in constant
//! time (runner tokens, session secrets, and the API tokens of the root package).

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(sha256(token))
}

/// A new random token (256 bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("kiln_{}", hex::encode(bytes))
}

/// Constant-time comparison of a presented token with a stored hash (hex).
pub fn token_matches(presented: &str, stored_hash_hex: &str) -> bool {
    let Ok(stored) = hex::decode(stored_hash_hex) else {
        return false;
    };
    bool::from(sha256(presented).as_slice().ct_eq(stored.as_slice()))
}
