//! `wasi:keyvalue@0.2.0-draft2`, the version Spin 4 serves, on the same store as
//! `wasi:keyvalue@0.2.0-draft` ([`super::keyvalue`]): same grants, buckets, backend and
//! quota, so a component sees the same keys whichever version it imports.
//!
//! What draft2 changes: `list-keys` cursors are strings (Trellis's are decimal offsets),
//! `increment` takes and returns a signed counter, `get-many` answers `(key, none)` for a
//! missing key, and compare-and-swap is new: `cas.new` reads a key's value, `swap` writes
//! only if the key still holds it (one statement on either backend), else answers
//! `cas-failed` with a fresh handle.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource};

use super::keyvalue::{Bucket, KeyValue, KeyValueBackend, KvError};
use crate::bindings::compat::wasi::keyvalue::{atomics, batch, store};
use crate::bindings::wasi::keyvalue as draft;

/// A compare-and-swap handle: the key and the value it held when the handle was made.
pub struct Cas {
    bucket: String,
    key: String,
    current: Option<Vec<u8>>,
}

struct HasKeyValue;

impl HasData for HasKeyValue {
    type Data<'a> = KeyValue<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> KeyValue<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKeyValue>(linker, view)?;
    atomics::add_to_linker::<T, HasKeyValue>(linker, view)?;
    batch::add_to_linker::<T, HasKeyValue>(linker, view)?;
    Ok(())
}

fn other(message: impl Into<String>) -> KvError {
    KvError::Guest(draft::store::Error::Other(message.into()))
}

impl store::Host for KeyValue<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        draft::store::Host::open(self, identifier).await
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<store::Error> {
        match err {
            KvError::Guest(draft::store::Error::NoSuchStore) => Ok(store::Error::NoSuchStore),
            KvError::Guest(draft::store::Error::AccessDenied) => Ok(store::Error::AccessDenied),
            KvError::Guest(draft::store::Error::Other(message)) => Ok(store::Error::Other(message)),
            KvError::Trap(e) => Err(e),
        }
    }
}

impl store::HostBucket for KeyValue<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvError> {
        draft::store::HostBucket::get(self, bucket, key).await
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        draft::store::HostBucket::set(self, bucket, key, value).await
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        draft::store::HostBucket::delete(self, bucket, key).await
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        draft::store::HostBucket::exists(self, bucket, key).await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<String>,
    ) -> Result<store::KeyResponse, KvError> {
        let offset = cursor
            .map(|c| {
                c.parse::<u64>()
                    .map_err(|_| other(format!("{c:?} is not a cursor this store gave")))
            })
            .transpose()?;
        let page = draft::store::HostBucket::list_keys(self, bucket, offset).await?;
        Ok(store::KeyResponse {
            keys: page.keys,
            cursor: page.cursor.map(|next| next.to_string()),
        })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        draft::store::HostBucket::drop(self, bucket).await
    }
}

impl atomics::Host for KeyValue<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Result<i64, KvError> {
        self.add(&bucket, &key, delta).await
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let Cas {
            bucket,
            key,
            current,
        } = self.table.delete(cas)?;
        let backend = match self.backend() {
            Ok(backend) => backend,
            Err(e) => return self.cas_error(e),
        };
        if let Err(e) = self.may_write() {
            return self.cas_error(e);
        }
        let meter = self.meter();
        match backend
            .compare_and_swap(&bucket, &key, current.as_deref(), &value)
            .await
        {
            Ok(true) => {
                super::keyvalue::wrote(meter).await;
                Ok(Ok(()))
            }
            Ok(false) => match backend.get(&bucket, &key).await {
                Ok(current) => {
                    let fresh = self.table.push(Cas {
                        bucket,
                        key,
                        current,
                    })?;
                    Ok(Err(atomics::CasError::CasFailed(fresh)))
                }
                Err(e) => self.cas_error(e.into()),
            },
            Err(e) => self.cas_error(e.into()),
        }
    }
}

impl atomics::HostCas for KeyValue<'_> {
    async fn new(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Resource<Cas>, KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        let current = backend.get(&name, &key).await?;
        Ok(self.table.push(Cas {
            bucket: name,
            key,
            current,
        })?)
    }

    async fn current(&mut self, cas: Resource<Cas>) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.table.get(&cas)?.current.clone())
    }

    async fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl KeyValue<'_> {
    fn backend(&self) -> Result<Arc<dyn KeyValueBackend>, KvError> {
        self.grant
            .map(|grant| grant.backend())
            .ok_or_else(|| KvError::Trap(wasmtime::format_err!("a cas handle without a grant")))
    }

    fn cas_error(&mut self, error: KvError) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let error = store::Host::convert_error(self, error)?;
        Ok(Err(atomics::CasError::StoreError(error)))
    }
}

impl batch::Host for KeyValue<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, KvError> {
        let (name, backend) = self.bucket(&bucket)?;
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let value = backend.get(&name, &key).await?;
            found.push((key, value));
        }
        Ok(found)
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        draft::batch::Host::set_many(self, bucket, key_values).await
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        draft::batch::Host::delete_many(self, bucket, keys).await
    }
}
