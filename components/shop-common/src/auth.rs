//! The shop's bearer tokens: HS256 JWTs issued by the user service at login and verified
//! by every service on its protected routes, all with the secret in the component's
//! `JWT_SECRET` config. The claims carry what authorization needs (user id, email, role),
//! so a service checks a token without calling the user service.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Request};

const ISSUER: &str = "trellis-shop";
/// Shorter secrets are refused: HS256 is only as strong as its key.
const MIN_SECRET_LEN: usize = 32;

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

/// A signed token for the user.
pub fn issue(user_id: &str, email: &str, role: &str) -> Result<String, ApiError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: user_id.to_string(),
        email: email.to_string(),
        role: role.to_string(),
        iss: ISSUER.to_string(),
        iat: now,
        exp: now + token_ttl(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret()?),
    )
    .map_err(|e| ApiError::internal(format!("signing a token: {e}")))
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
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    validation.leeway = 5;
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&secret()?), &validation)
        .map(|data| data.claims)
        .map_err(|e| ApiError::unauthorized(format!("the token is not valid: {e}")))
}
