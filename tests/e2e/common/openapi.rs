//! Checks an OpenAPI 3.1 document against real exchanges: each answer's operation and
//! status are documented, it has a body exactly when the document gives the status
//! content, in a documented media type and accepted by its schema; and every documented
//! operation was exercised. Local `$ref`s to responses (`#/components/responses/...`) and
//! to schemas (`#/components/schemas/...`) are followed.

use std::collections::BTreeSet;

use serde_json::Value;

use super::Response;

/// The methods a path item may hold operations for.
pub const HTTP_METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

/// One request and its answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// The request's path, with its query if it had one.
    pub path: String,
    pub status: u16,
    /// The answer's body: JSON for a JSON media type, the text for any other, `null`
    /// when it was empty.
    pub body: Value,
    /// The answer's `content-type` ("" when it had none).
    pub content_type: String,
}

impl Exchange {
    /// The exchange `response` answered, its body read as its content type says. Fails
    /// when a JSON answer is not JSON.
    pub fn new(method: &str, path: &str, response: &Response) -> Result<Exchange, String> {
        let content_type = content_type(response);
        let body = if response.body.is_empty() {
            Value::Null
        } else if is_json(&content_type) {
            serde_json::from_str(&response.body).map_err(|e| {
                format!(
                    "{method} {path}: the {content_type} answer is not JSON ({e}): {}",
                    response.body
                )
            })?
        } else {
            Value::String(response.body.clone())
        };
        Ok(Exchange {
            method: method.to_string(),
            path: path.to_string(),
            status: response.status,
            body,
            content_type,
        })
    }
}

/// The `content-type` of `response`, "" when it has none.
pub fn content_type(response: &Response) -> String {
    response
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A media type without its parameters, lower-case: `application/json; charset=utf-8`
/// is `application/json`.
fn essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media_type: &str) -> bool {
    let essence = essence(media_type);
    essence == "application/json" || essence.ends_with("+json")
}

/// Every disagreement between `spec` and `exchanges`, and every operation of `spec` no
/// exchange exercised; empty when they agree.
pub fn check(spec: &Value, exchanges: &[Exchange]) -> Vec<String> {
    let mut exercised = BTreeSet::new();
    let mut problems = Vec::new();
    for exchange in exchanges {
        let Some((template, operation)) = operation_for(spec, exchange) else {
            problems.push(format!(
                "{} {} is not in the document",
                exchange.method, exchange.path
            ));
            continue;
        };
        exercised.insert(format!("{} {template}", exchange.method));
        let Some(documented) = operation["responses"].get(exchange.status.to_string()) else {
            problems.push(format!(
                "{} {template}: status {} is not documented ({})",
                exchange.method, exchange.status, exchange.body
            ));
            continue;
        };
        let at = format!("{} {template} {}", exchange.method, exchange.status);
        let Some(response) = resolve(spec, documented) else {
            problems.push(format!("{at}: its $ref does not resolve: {documented}"));
            continue;
        };
        let content = response
            .get("content")
            .and_then(Value::as_object)
            .filter(|content| !content.is_empty());
        match (content, exchange.body.is_null()) {
            (None, true) => {}
            (None, false) => problems.push(format!(
                "{at}: documented without a body, got {}",
                exchange.body
            )),
            (Some(_), true) => problems.push(format!("{at}: documented with a body, got none")),
            (Some(content), false) => {
                let answered = essence(&exchange.content_type);
                let Some(media) = content
                    .iter()
                    .find(|(media_type, _)| essence(media_type) == answered)
                    .map(|(_, media)| media)
                else {
                    problems.push(format!(
                        "{at}: answered as {:?}, documented as {}",
                        exchange.content_type,
                        content.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                    continue;
                };
                if let Some(schema) = media.get("schema") {
                    problems.extend(
                        validate(spec, schema, &exchange.body)
                            .into_iter()
                            .map(|error| format!("{at}: {error} in {}", exchange.body)),
                    );
                }
            }
        }
    }
    let documented: BTreeSet<String> = operations(spec)
        .into_iter()
        .map(|(method, template)| format!("{method} {template}"))
        .collect();
    for missing in documented.difference(&exercised) {
        problems.push(format!("{missing} is documented but never exercised"));
    }
    problems
}

/// Why `schema` (which may refer to `#/components/...` of `spec`) does not accept
/// `instance`, one line per violation; empty when it does.
pub fn validate(spec: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let mut rooted = schema.clone();
    rooted["components"] = spec["components"].clone();
    let validator = jsonschema::validator_for(&rooted)
        .unwrap_or_else(|e| panic!("the schema {schema} does not compile: {e}"));
    validator
        .iter_errors(instance)
        .map(|error| format!("{error} at {}", error.instance_path()))
        .collect()
}

/// Every operation of `spec`: its method (upper-case) and path template.
pub fn operations(spec: &Value) -> Vec<(String, String)> {
    spec["paths"]
        .as_object()
        .expect("the document has paths")
        .iter()
        .flat_map(|(template, item)| {
            item.as_object()
                .expect("a path item is an object")
                .keys()
                .filter(|key| HTTP_METHODS.contains(&key.as_str()))
                .map(move |method| (method.to_uppercase(), template.clone()))
        })
        .collect()
}

/// The document's path template and operation for a request: the template whose literal
/// segments match most (so `/users/me` wins over `/users/{id}`).
pub fn operation_for<'a>(spec: &'a Value, exchange: &Exchange) -> Option<(String, &'a Value)> {
    let path = exchange.path.split('?').next().unwrap();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    spec["paths"]
        .as_object()?
        .iter()
        .filter_map(|(template, item)| {
            let parts: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literal = 0;
            for (part, segment) in parts.iter().zip(&segments) {
                if part.starts_with('{') {
                    continue;
                }
                if part != segment {
                    return None;
                }
                literal += 1;
            }
            let operation = item.get(exchange.method.to_lowercase())?;
            Some((literal, template.clone(), operation))
        })
        .max_by_key(|(literal, _, _)| *literal)
        .map(|(_, template, operation)| (template, operation))
}

/// `item`, or what its local `$ref` (`#/JSON/pointer`) leads to; `None` when that is
/// not in `spec`.
fn resolve<'a>(spec: &'a Value, item: &'a Value) -> Option<&'a Value> {
    match item.get("$ref").and_then(Value::as_str) {
        Some(reference) => resolve(spec, spec.pointer(reference.strip_prefix('#')?)?),
        None => Some(item),
    }
}
