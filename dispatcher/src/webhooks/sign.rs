//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>, `spec/standard-webhooks.md`):
//! every delivery carries `webhook-id` (the request id, the same on every attempt, so receivers can
//! dedupe), `webhook-timestamp` (unix seconds of this attempt) and `webhook-signature: v1,<base64>` where
//! the base64 is HMAC-SHA256, keyed with the secret's bytes, over `"{id}.{timestamp}.{body}"`. The secret
//! is given in the spec's `whsec_<base64>` form. The README shows how a receiver verifies it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header names of the spec.
pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// Prefix of the spec's textual secret form.
const PREFIX: &str = "whsec_";

/// The signing key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret is `whsec_` followed by base64")]
    Prefix,
    #[error("the webhook secret is not valid base64")]
    Base64,
    #[error("the webhook secret must hold at least 24 bytes")]
    TooShort,
}

impl std::str::FromStr for Secret {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b64 = s.trim().strip_prefix(PREFIX).ok_or(SecretError::Prefix)?;
        let key = B64.decode(b64).map_err(|_| SecretError::Base64)?;
        // The spec asks for 24 to 64 bytes of key material.
        if key.len() < 24 {
            return Err(SecretError::TooShort);
        }
        Ok(Secret(key))
    }
}

impl Secret {
    /// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC-SHA256 takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_spec_example() {
        // The example of standard-webhooks' reference libraries (`libraries/python/.../test_webhooks.py`).
        let secret: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            .parse()
            .expect("secret");
        let sig = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn bad_secrets_are_refused_and_never_shown() {
        assert_eq!("abc".parse::<Secret>(), Err(SecretError::Prefix));
        assert_eq!("whsec_!!".parse::<Secret>(), Err(SecretError::Base64));
        assert_eq!("whsec_YWJj".parse::<Secret>(), Err(SecretError::TooShort));
        let s: Secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            .parse()
            .expect("secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }
}
