//! Domain events: JSON bodies published on `wasmcloud:messaging` subjects such as
//! `order.created`. The host namespaces them per tenant and checks the `publish` grant.

use serde::Serialize;

use crate::api::ApiError;
use crate::wasmcloud::messaging::consumer;
use crate::wasmcloud::messaging::types::BrokerMessage;

pub fn publish(subject: &str, event: &impl Serialize) -> Result<(), ApiError> {
    let body = serde_json::to_vec(event).expect("plain data serializes");
    consumer::publish(&BrokerMessage {
        subject: subject.to_string(),
        body,
        reply_to: None,
    })
    .map_err(|e| ApiError::internal(format!("publishing {subject}: {e}")))
}

/// An event's body as `T`; a body that does not parse is the handler's error (the host
/// retries it, then dead-letters it).
pub fn parse<T: serde::de::DeserializeOwned>(subject: &str, body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("{subject}: malformed event: {e}"))
}
