//! The shop's bearer tokens: HS256 JWTs issued by the user service at login and verified
//! by every service on its protected routes, all with the secret in the component's
//! `JWT_SECRET` config. The claims carry what authorization needs (user id, email, role),
//! so a service checks a token without calling the user service.
//!
//! HS256 is all the shop uses, so tokens are made and checked here with HMAC-SHA256
//! (RustCrypto's `hmac` and `sha2`) rather than a general JWT library: that kept RSA and
//! elliptic-curve code out of every service (each component is a third smaller) and made a
//! check a few microseconds. Only `alg: HS256` is accepted (never `none`), the signature is
//! compared in constant time before the claims are read, and `iss`, `sub` and `exp` are
//! required (with 5 s of leeway on `exp`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::api::{ApiError, Request};

const ISSUER: &str = "trellis-shop";
/// Shorter secrets are refused: HS256 is only as strong as its key.
const MIN_SECRET_LEN: usize = 32;
/// Seconds a token is still accepted after its `exp`, for clocks slightly apart.
const LEEWAY: u64 = 5;
/// `{"alg":"HS256","typ":"JWT"}`, the only header this issues.
const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    pub email: String,
    /// `customer` or `admin`.
    pub role: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    /// 403 unless the token belongs to `owner` or to an admin.
    pub fn require_owner_or_admin(&self, owner: &str) -> Result<(), ApiError> {
        if self.sub == owner || self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this belongs to another user"))
        }
    }

    /// Whose items a list shows for `?user_id=requested`: that user (only an admin may ask
    /// for someone else), or without it the caller's own (`None`: everyone's, for an admin).
    pub fn list_scope(&self, requested: Option<&str>) -> Result<Option<String>, ApiError> {
        match requested {
            Some(user) if user != self.sub => {
                self.require_admin()?;
                Ok(Some(user.to_string()))
            }
            Some(user) => Ok(Some(user.to_string())),
            None if self.is_admin() => Ok(None),
            None => Ok(Some(self.sub.clone())),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs an admin"))
        }
    }
}

fn secret() -> Result<Vec<u8>, ApiError> {
    match crate::config("JWT_SECRET") {
        Some(secret) if secret.len() >= MIN_SECRET_LEN => Ok(secret.into_bytes()),
        Some(_) => Err(ApiError::internal(format!(
            "JWT_SECRET must be at least {MIN_SECRET_LEN} bytes"
        ))),
        None => Err(ApiError::internal("JWT_SECRET is not configured")),
    }
}

/// Lifetime of a token, from `TOKEN_TTL_SECONDS` (one hour by default).
pub fn token_ttl() -> u64 {
    crate::config("TOKEN_TTL_SECONDS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3600)
}

fn mac(secret: &[u8]) -> Result<Hmac<Sha256>, ApiError> {
    Hmac::<Sha256>::new_from_slice(secret)
        .map_err(|e| ApiError::internal(format!("JWT_SECRET: {e}")))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A signed token for the user.
pub fn issue(user_id: &str, email: &str, role: &str) -> Result<String, ApiError> {
    let now = now();
    let claims = Claims {
        sub: user_id.to_string(),
        email: email.to_string(),
        role: role.to_string(),
        iss: ISSUER.to_string(),
        iat: now,
        exp: now + token_ttl(),
    };
    let payload = serde_json::to_vec(&claims)
        .map_err(|e| ApiError::internal(format!("encoding a token: {e}")))?;
    let signed = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
    let mut mac = mac(&secret()?)?;
    mac.update(signed.as_bytes());
    Ok(format!(
        "{signed}.{}",
        B64.encode(mac.finalize().into_bytes())
    ))
}

/// Why a token was refused (the 401's message).
fn invalid(reason: &str) -> ApiError {
    ApiError::unauthorized(format!("the token is not valid: {reason}"))
}

#[derive(Deserialize)]
struct TokenHeader {
    alg: String,
}

/// The claims of `token` if it is an HS256 JWT signed with `secret`, from this issuer and
/// not expired at `now`.
fn verify(token: &str, secret: &[u8], now: u64) -> Result<Claims, ApiError> {
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return Err(invalid("not a JWT (three dot-separated parts)"));
    };
    let Some((header, payload)) = signed.split_once('.').filter(|(_, p)| !p.contains('.')) else {
        return Err(invalid("not a JWT (three dot-separated parts)"));
    };
    let header: TokenHeader = B64
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| invalid("its header is not base64url JSON"))?;
    if header.alg != "HS256" {
        return Err(invalid("only HS256 tokens are accepted"));
    }
    let signature = B64
        .decode(signature)
        .map_err(|_| invalid("its signature is not base64url"))?;
    let mut mac = mac(secret)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| invalid("InvalidSignature"))?;
    let claims: Claims = B64
        .decode(payload)
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or_else(|| {
            invalid("its claims are missing or malformed (sub, iss and exp are required)")
        })?;
    if claims.iss != ISSUER {
        return Err(invalid("InvalidIssuer"));
    }
    if claims.exp.saturating_add(LEEWAY) < now {
        return Err(invalid("ExpiredSignature"));
    }
    Ok(claims)
}

/// The caller's claims from `Authorization: Bearer TOKEN`, or 401.
pub fn authenticate(request: &Request) -> Result<Claims, ApiError> {
    let header = request
        .header("authorization")
        .ok_or_else(|| ApiError::unauthorized("this needs an Authorization: Bearer token"))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be 'Bearer TOKEN'"))?
        .trim();
    verify(token, &secret()?, now())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(claims: &str, secret: &[u8], header: &str) -> String {
        let signed = format!("{}.{}", B64.encode(header), B64.encode(claims));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(signed.as_bytes());
        format!("{signed}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    const CLAIMS: &str = r#"{"sub":"u1","email":"a@b.c","role":"customer","iss":"trellis-shop","iat":100,"exp":200}"#;

    #[test]
    fn accepts_a_good_token_and_refuses_every_bad_one() {
        let good = token(CLAIMS, SECRET, HEADER);
        assert_eq!(verify(&good, SECRET, 150).unwrap().sub, "u1");
        assert_eq!(
            verify(&good, SECRET, 204).unwrap().sub,
            "u1",
            "within the leeway"
        );
        assert!(verify(&good, SECRET, 206).is_err(), "expired");
        assert!(verify(&good, b"another secret, 32 bytes long!!!", 150).is_err());
        let none = token(CLAIMS, SECRET, r#"{"alg":"none","typ":"JWT"}"#);
        assert!(verify(&none, SECRET, 150).is_err(), "alg none");
        let other_issuer = token(&CLAIMS.replace("trellis-shop", "evil"), SECRET, HEADER);
        assert!(verify(&other_issuer, SECRET, 150).is_err());
        let no_exp = token(
            r#"{"sub":"u1","email":"a","role":"admin","iss":"trellis-shop","iat":1}"#,
            SECRET,
            HEADER,
        );
        assert!(verify(&no_exp, SECRET, 150).is_err());
        assert!(verify("a.b", SECRET, 150).is_err());
    }
}
