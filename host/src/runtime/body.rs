//! Request bodies metered as they flow. A component's `limits.max_body` is counted chunk by
//! chunk while the body streams into the guest, so neither the gateway nor a
//! `NAME.internal` call holds a body back until it has all arrived (a caller may wait for
//! the response head before it writes its body, or read the answer while still writing).
//!
//! Passing the limit fails the guest's next read with `HTTP-request-body-size` and marks
//! the call ([`Overflow`]): an answer not yet sent becomes 413, and a response already
//! streaming is cut off (the client sees a reset, never a body that looks complete).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Whether a call's request body passed its limit; shared by the request and response side.
#[derive(Clone, Default)]
pub struct Overflow(Arc<AtomicBool>);

impl Overflow {
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A request body that counts its bytes and fails once they pass `max`.
pub struct Metered<B> {
    inner: B,
    max: u64,
    seen: u64,
    overflow: Overflow,
}

impl<B> Metered<B> {
    pub fn new(inner: B, max: u64, overflow: Overflow) -> Self {
        Self {
            inner,
            max,
            seen: 0,
            overflow,
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.seen > this.max {
            return Poll::Ready(Some(Err(too_large(this.max))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.max {
                        this.overflow.mark();
                        return Poll::Ready(Some(Err(too_large(this.max))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn too_large(max: u64) -> wasmtime_wasi_http::Error {
    wasmtime_wasi_http::Error::HttpRequestBodySize(Some(max))
}

/// A response body that ends in an error, instead of its end, when the request body of
/// the same call passed its limit: the guest's answer to a truncated request must not
/// reach the client as if it were whole.
pub struct CutOnOverflow<B> {
    inner: B,
    overflow: Overflow,
}

impl<B> CutOnOverflow<B> {
    pub fn new(inner: B, overflow: Overflow) -> Self {
        Self { inner, overflow }
    }
}

/// The error a cut-off response ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body passed the component's max_body; the response was cut off")]
pub struct BodyCutOff;

impl<B> Body for CutOnOverflow<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::capabilities::outbound::BoxError>,
{
    type Data = Bytes;
    type Error = crate::capabilities::outbound::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.overflow.happened() {
            return Poll::Ready(Some(Err(Box::new(BodyCutOff))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) if this.overflow.happened() => {
                Poll::Ready(Some(Err(Box::new(BodyCutOff))))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never claim the end early: the overflow may still be reported.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    fn never(never: std::convert::Infallible) -> wasmtime_wasi_http::Error {
        match never {}
    }

    #[tokio::test]
    async fn counts_bytes_and_fails_past_the_limit() {
        let overflow = Overflow::default();
        let small = Metered::new(
            Full::new(Bytes::from_static(b"12345")).map_err(never),
            5,
            overflow.clone(),
        );
        assert_eq!(small.collect().await.unwrap().to_bytes().len(), 5);
        assert!(!overflow.happened());

        let large = Metered::new(
            Full::new(Bytes::from_static(b"123456")).map_err(never),
            5,
            overflow.clone(),
        );
        assert!(large.collect().await.is_err());
        assert!(overflow.happened());
    }
}
