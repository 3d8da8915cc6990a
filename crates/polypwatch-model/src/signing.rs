//! ed25519 signatures over model manifests (crate `ed25519-dalek`).
//!
//! A manifest carries the sha256 of its `.onnx` (and of its self-test files), so one detached
//! signature over the manifest's bytes covers the whole model. The signature file
//! (`<manifest>.sig`) is TOML naming the signing key, so "signed by a key we do not trust" and
//! "signature does not match" are told apart.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ed25519:";
const SECRET_HEADER: &str = "polypwatch-secret-key";

/// Signature problems.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignError {
    /// A key string is not `ed25519:<base64 of 32 bytes>`.
    #[error("{what} is not an ed25519 key (expected \"ed25519:<base64>\" as keygen writes): {why}")]
    BadKey {
        /// Which key.
        what: String,
        /// Why.
        why: String,
    },
    /// The signature file is malformed.
    #[error("signature file is malformed: {0}")]
    Malformed(String),
    /// Signed by a key that is not in `[update] trusted_keys`.
    #[error("signed by key {0}, which is not in [update] trusted_keys")]
    UnknownKey(String),
    /// The key is trusted but the signature does not match the manifest's bytes.
    #[error("signature by key {0} does not match the manifest: it was altered after signing")]
    BadSignature(String),
    /// The operating system's random source failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// A public key that may sign models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses `ed25519:<base64>`.
    pub fn parse(text: &str) -> Result<Self, SignError> {
        let bad = |why: &str| SignError::BadKey {
            what: format!("{:?}", truncate(text)),
            why: why.into(),
        };
        let b64 = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("missing the ed25519: prefix"))?;
        let bytes: [u8; 32] = B64
            .decode(b64)
            .map_err(|e| bad(&e.to_string()))?
            .try_into()
            .map_err(|_| bad("not 32 bytes"))?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|e| bad(&e.to_string()))
    }

    /// Short fingerprint for messages: the first 16 characters of the base64 key.
    pub fn id(&self) -> String {
        B64.encode(self.0.as_bytes())[..16].to_string()
    }
}

fn truncate(s: &str) -> &str {
    s.get(..24).unwrap_or(s)
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}", B64.encode(self.0.as_bytes()))
    }
}

/// A signing key. Its text form is one line, `polypwatch-secret-key ed25519:<base64 seed>`.
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new random key from the operating system's random source.
    pub fn generate() -> Result<Self, SignError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| SignError::Random(e.to_string()))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// Parses the text form.
    pub fn parse(text: &str) -> Result<Self, SignError> {
        let bad = |why: &str| SignError::BadKey {
            what: "secret key file".into(),
            why: why.into(),
        };
        let rest = text
            .trim()
            .strip_prefix(SECRET_HEADER)
            .ok_or_else(|| bad("not a polypwatch secret key (did you pass the .pub file?)"))?;
        let b64 = rest
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("missing the ed25519: prefix"))?;
        let seed: [u8; 32] = B64
            .decode(b64)
            .map_err(|e| bad(&e.to_string()))?
            .try_into()
            .map_err(|_| bad("not 32 bytes"))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// The text form (keep it secret).
    pub fn to_text(&self) -> String {
        format!(
            "{SECRET_HEADER} {PREFIX}{}\n",
            B64.encode(self.0.to_bytes())
        )
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `message` (a manifest's bytes).
    pub fn sign(&self, message: &[u8]) -> SignatureFile {
        SignatureFile {
            key: self.public().to_string(),
            signature: B64.encode(self.0.sign(message).to_bytes()),
        }
    }
}

/// The detached signature file beside a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureFile {
    /// The signing key, `ed25519:<base64>`.
    pub key: String,
    /// The signature over the manifest's bytes, base64.
    pub signature: String,
}

impl SignatureFile {
    /// Parses the TOML text.
    pub fn parse(text: &str) -> Result<Self, SignError> {
        toml::from_str(text).map_err(|e| SignError::Malformed(e.message().to_string()))
    }

    /// TOML text.
    pub fn to_text(&self) -> String {
        toml::to_string(self).expect("a signature always serialises")
    }

    /// Checks the signature over `message` against the trusted keys; returns the key used.
    pub fn verify(&self, message: &[u8], trusted: &[PublicKey]) -> Result<PublicKey, SignError> {
        let key = PublicKey::parse(&self.key)?;
        if !trusted.contains(&key) {
            return Err(SignError::UnknownKey(key.id()));
        }
        let bytes: [u8; 64] = B64
            .decode(&self.signature)
            .map_err(|e| SignError::Malformed(format!("signature: {e}")))?
            .try_into()
            .map_err(|_| SignError::Malformed("signature is not 64 bytes".into()))?;
        key.0
            .verify(message, &ed25519_dalek::Signature::from_bytes(&bytes))
            .map_err(|_| SignError::BadSignature(key.id()))?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_each_failure_has_its_message() {
        let k = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let trusted = [k.public()];
        let sig = SignatureFile::parse(&k.sign(b"manifest").to_text()).unwrap();
        assert_eq!(sig.verify(b"manifest", &trusted).unwrap(), k.public());
        assert!(matches!(
            sig.verify(b"manifesT", &trusted),
            Err(SignError::BadSignature(_))
        ));
        assert!(matches!(
            other.sign(b"manifest").verify(b"manifest", &trusted),
            Err(SignError::UnknownKey(_))
        ));
        // A trusted key named in the file with someone else's signature.
        let forged = SignatureFile {
            key: k.public().to_string(),
            signature: other.sign(b"manifest").signature,
        };
        assert!(matches!(
            forged.verify(b"manifest", &trusted),
            Err(SignError::BadSignature(_))
        ));
        assert!(matches!(
            SignatureFile::parse("key = 1"),
            Err(SignError::Malformed(_))
        ));
    }

    #[test]
    fn keys_round_trip_and_bad_keys_are_named() {
        let k = SecretKey::generate().unwrap();
        let k2 = SecretKey::parse(&k.to_text()).unwrap();
        assert_eq!(k.public(), k2.public());
        let p = PublicKey::parse(&k.public().to_string()).unwrap();
        assert_eq!(p, k.public());
        assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err());
        assert!(PublicKey::parse("ed25519:AAAA").is_err());
        let err = SecretKey::parse(&k.public().to_string()).err().unwrap();
        assert!(err.to_string().contains(".pub"), "{err}");
    }
}
