//! Tenant tokens: bearer tokens the operator issues for one tenant. A token is shown once,
//! when it is issued; the node keeps only its SHA-256 (with the id it is looked up by),
//! so a copy of the node's state gives nobody a usable token. A token is revoked by id.
//!
//! A token reads `trellis_tenant_ID_SECRET`: the id finds the record, the whole token's
//! hash must match it (compared in constant time).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const PREFIX: &str = "trellis_tenant_";

/// A stored token: never the token itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub tenant: String,
    /// Hex SHA-256 of the whole token.
    pub hash: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// The tokens the node knows, by id.
#[derive(Default)]
pub struct TokenSet {
    by_id: Mutex<HashMap<String, TokenRecord>>,
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TokenSet {
    pub fn load(records: Vec<TokenRecord>) -> Self {
        Self {
            by_id: Mutex::new(records.into_iter().map(|r| (r.id.clone(), r)).collect()),
        }
    }

    /// A new token for `tenant`: the token (to show once) and its record (to store).
    pub fn issue(tenant: &str, label: Option<String>) -> std::io::Result<(String, TokenRecord)> {
        let id = random_hex(6)?;
        let token = format!("{PREFIX}{id}_{}", random_hex(24)?);
        let record = TokenRecord {
            id,
            tenant: tenant.to_string(),
            hash: hash(&token),
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            label,
        };
        Ok((token, record))
    }

    pub fn insert(&self, record: TokenRecord) {
        self.by_id
            .lock()
            .expect("tokens lock")
            .insert(record.id.clone(), record);
    }

    /// Removes a token of `tenant`; answers whether it was there.
    pub fn revoke(&self, tenant: &str, id: &str) -> bool {
        let mut by_id = self.by_id.lock().expect("tokens lock");
        if by_id.get(id).is_some_and(|r| r.tenant == tenant) {
            by_id.remove(id);
            true
        } else {
            false
        }
    }

    /// Removes every token of `tenant`; answers their ids.
    pub fn revoke_all(&self, tenant: &str) -> Vec<String> {
        let mut by_id = self.by_id.lock().expect("tokens lock");
        let ids: Vec<String> = by_id
            .values()
            .filter(|r| r.tenant == tenant)
            .map(|r| r.id.clone())
            .collect();
        for id in &ids {
            by_id.remove(id);
        }
        ids
    }

    pub fn of(&self, tenant: &str) -> Vec<TokenRecord> {
        let mut records: Vec<TokenRecord> = self
            .by_id
            .lock()
            .expect("tokens lock")
            .values()
            .filter(|r| r.tenant == tenant)
            .cloned()
            .collect();
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        records
    }

    /// The tenant a presented token belongs to, if it is a live token.
    pub fn tenant_of(&self, presented: &str) -> Option<String> {
        let (id, _) = presented.strip_prefix(PREFIX)?.split_once('_')?;
        let by_id = self.by_id.lock().expect("tokens lock");
        let record = by_id.get(id)?;
        let (a, b) = (hash(presented), &record.hash);
        let same = a.len() == b.len()
            && a.bytes()
                .zip(b.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0;
        same.then(|| record.tenant.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_known_by_its_hash_until_revoked() {
        let set = TokenSet::default();
        let (token, record) = TokenSet::issue("acme", None).unwrap();
        assert!(!record.hash.contains(&token) && record.hash.len() == 64);
        set.insert(record.clone());
        assert_eq!(set.tenant_of(&token).as_deref(), Some("acme"));
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert_eq!(set.tenant_of(&forged), None);
        assert!(
            !set.revoke("other", &record.id),
            "only its own tenant revokes it"
        );
        assert!(set.revoke("acme", &record.id));
        assert_eq!(set.tenant_of(&token), None);
    }
}
