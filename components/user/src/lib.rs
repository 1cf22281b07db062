//! The shop's **user** service: registration, login and profiles, on its own database.
//!
//! Passwords are hashed with argon2id (a fresh salt each, from `wasi:random`); login
//! answers a JWT signed with the component's `JWT_SECRET`, which the other services verify
//! on their own. Emails listed in the `ADMIN_EMAILS` config (comma-separated) register as
//! admins. Every route but registration and login needs the token; a customer may read,
//! change and delete only themself, an admin anyone, and only an admin may list users.

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use serde::Deserialize;
use serde_json::{Value, json};
use shop_common::api::required;
use shop_common::auth::{self, Claims};
use shop_common::db::{self, Db, Sql};
use shop_common::{ApiError, ApiResult, Page, Request, Response, params};

struct UserService;

shop_common::export_http!(UserService, route);

fn route(request: &Request) -> ApiResult {
    let Some(segments) = request.segments_after("/api/v1") else {
        return Err(ApiError::no_such_path());
    };
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["users"]) => register(request),
        ("GET", ["users"]) => list(request),
        ("GET", ["users", "me"]) => {
            let claims = auth::authenticate(request)?;
            get(request, &claims.sub)
        }
        ("GET", ["users", id]) => get(request, id),
        ("PATCH", ["users", id]) => update(request, id),
        ("DELETE", ["users", id]) => delete(request, id),
        ("POST", ["auth", "login"]) => login(request),
        (_, ["users"] | ["users", _] | ["auth", "login"]) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::no_such_path()),
    }
}

const COLUMNS: &str = "id, email, name, role, created_at, updated_at";

fn user_json(row: &[db::Value]) -> Value {
    json!({
        "id": db::text(row, 0),
        "email": db::text(row, 1),
        "name": db::text(row, 2),
        "role": db::text(row, 3),
        "created_at": db::text(row, 4),
        "updated_at": db::text(row, 5),
    })
}

fn find(id: &str) -> Result<Value, ApiError> {
    Db.row(
        &format!("SELECT {COLUMNS} FROM users WHERE id = $1"),
        params![id],
    )?
    .map(|row| user_json(&row))
    .ok_or_else(|| ApiError::not_found("user"))
}

/// The email, normalised (trimmed, lower case), or 422.
fn valid_email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    if email.len() > 254 || !email_address::EmailAddress::is_valid(&email) {
        return Err(ApiError::invalid(
            "email",
            format!("{raw:?} is not a valid email address"),
        ));
    }
    // A bare `user@localhost` is valid by RFC but never a customer's address.
    if !email
        .rsplit('@')
        .next()
        .is_some_and(|domain| domain.contains('.'))
    {
        return Err(ApiError::invalid(
            "email",
            format!("{raw:?} has no domain name"),
        ));
    }
    Ok(email)
}

fn valid_name(raw: &str) -> Result<String, ApiError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::invalid(
            "name",
            "name must be 1 to 100 characters",
        ));
    }
    Ok(name.to_string())
}

fn hash_password(password: &str) -> Result<String, ApiError> {
    if password.chars().count() < 8 {
        return Err(ApiError::invalid(
            "password",
            "password must be at least 8 characters",
        ));
    }
    if password.len() > 1024 {
        return Err(ApiError::invalid(
            "password",
            "password must be at most 1024 bytes",
        ));
    }
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| ApiError::internal(format!("hashing a password: {e}")))
}

#[derive(Deserialize)]
struct Registration {
    email: Option<String>,
    password: Option<String>,
    name: Option<String>,
}

fn register(request: &Request) -> ApiResult {
    let body: Registration = request.json()?;
    let email = valid_email(&required(body.email, "email")?)?;
    let name = valid_name(&required(body.name, "name")?)?;
    let password_hash = hash_password(&required(body.password, "password")?)?;
    let admins = shop_common::config("ADMIN_EMAILS").unwrap_or_default();
    let role = if admins
        .split(',')
        .any(|a| a.trim().eq_ignore_ascii_case(&email))
    {
        "admin"
    } else {
        "customer"
    };
    let id = shop_common::new_id("usr");
    let now = shop_common::now();
    match Db.raw_execute(
        "INSERT INTO users (id, email, name, role, password_hash, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6)",
        params![&id, &email, &name, role, password_hash, &now],
    ) {
        Ok(_) => Ok(Response::created(&find(&id)?)),
        Err(e) if db::is_unique_violation(&e) => Err(email_taken(&email)),
        Err(e) => Err(db::storage_error(e)),
    }
}

fn email_taken(email: &str) -> ApiError {
    ApiError::new(409, "email_taken", format!("{email} is already registered")).on("email")
}

#[derive(Deserialize)]
struct Login {
    email: Option<String>,
    password: Option<String>,
}

fn login(request: &Request) -> ApiResult {
    let body: Login = request.json()?;
    let email = required(body.email, "email")?.trim().to_lowercase();
    let password = required(body.password, "password")?;
    let row = Db.row(
        &format!("SELECT {COLUMNS}, password_hash FROM users WHERE email = $1"),
        params![&email],
    )?;
    let verified = match &row {
        Some(row) => PasswordHash::new(&db::text(row, 6))
            .map(|hash| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            })
            .unwrap_or(false),
        None => {
            // As costly as checking a password, so the time taken does not tell an
            // unknown email from a wrong password.
            let _ = Argon2::default().hash_password(password.as_bytes());
            false
        }
    };
    let Some(row) = row.filter(|_| verified) else {
        return Err(ApiError::new(
            401,
            "invalid_credentials",
            "wrong email or password",
        ));
    };
    let user = user_json(&row);
    let token = auth::issue(&db::text(&row, 0), &email, &db::text(&row, 3))?;
    Ok(Response::ok(&json!({
        "token": token,
        "token_type": "Bearer",
        "expires_in": auth::token_ttl(),
        "user": user,
    })))
}

fn get(request: &Request, id: &str) -> ApiResult {
    let claims = auth::authenticate(request)?;
    claims.require_owner_or_admin(id)?;
    Ok(Response::ok(&find(id)?))
}

#[derive(Deserialize)]
struct Update {
    email: Option<String>,
    name: Option<String>,
    password: Option<String>,
}

fn update(request: &Request, id: &str) -> ApiResult {
    let claims: Claims = auth::authenticate(request)?;
    claims.require_owner_or_admin(id)?;
    let body: Update = request.json()?;
    find(id)?;
    let email = body.email.as_deref().map(valid_email).transpose()?;
    let name = body.name.as_deref().map(valid_name).transpose()?;
    let password_hash = body.password.as_deref().map(hash_password).transpose()?;
    let result = Db.raw_execute(
        "UPDATE users SET email = COALESCE($2, email), name = COALESCE($3, name), \
         password_hash = COALESCE($4, password_hash), updated_at = $5 WHERE id = $1",
        params![id, email.clone(), name, password_hash, shop_common::now()],
    );
    match result {
        Ok(_) => Ok(Response::ok(&find(id)?)),
        Err(e) if db::is_unique_violation(&e) => Err(email_taken(email.as_deref().unwrap_or(""))),
        Err(e) => Err(db::storage_error(e)),
    }
}

fn delete(request: &Request, id: &str) -> ApiResult {
    let claims = auth::authenticate(request)?;
    claims.require_owner_or_admin(id)?;
    match Db.execute("DELETE FROM users WHERE id = $1", params![id])? {
        0 => Err(ApiError::not_found("user")),
        _ => Ok(Response::no_content()),
    }
}

fn list(request: &Request) -> ApiResult {
    auth::authenticate(request)?.require_admin()?;
    let page = Page::from_query(request)?;
    let total = Db.count("SELECT COUNT(*) FROM users", &[])?;
    let items = Db
        .rows(
            &format!("SELECT {COLUMNS} FROM users ORDER BY created_at, id LIMIT $1 OFFSET $2"),
            params![page.limit, page.offset],
        )?
        .iter()
        .map(|row| user_json(row))
        .collect();
    Ok(page.answer(items, total))
}
