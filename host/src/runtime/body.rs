//! Request bodies metered as they flow. A component's `limits.max_body` is counted chunk by
//! chunk while the body streams into the guest, so neither the gateway nor a
//! `NAME.internal` call holds a body back until it has all arrived (a caller may wait for
//! the response head before it writes its body, or read the answer while still writing).
//!
//! Passing the limit fails the guest's next read with `HTTP-request-body-size` and marks
//! the call ([`RequestBody`]): an answer not yet sent becomes 413, and a response already
//! streaming is cut off (the client sees a reset, never a body that looks complete).
//! Whether the guest was waiting for the client's bytes is tracked too: a body too large
//! or too slow is the client's doing, not a failure of the component (no trap or deadline
//! kill is counted against it, and a canary is not judged by it).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// A flag one side of a call raises and the other reads (request and response side, or
/// the instance and its response body).
#[derive(Clone, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn set(&self, value: bool) {
        self.0.store(value, Ordering::Release);
    }
}

/// What the metering saw of one call's request body.
#[derive(Clone, Default)]
pub struct RequestBody {
    /// It passed `max_body`.
    pub overflow: Flag,
    /// The guest is waiting for bytes the client has not sent yet.
    waiting: Flag,
}

impl RequestBody {
    /// Whether `failure` is the client's doing: its body was too large, or the guest was
    /// still waiting for it when the deadline came.
    pub fn clients_fault(&self, failure: &crate::runtime::invoke::Failure) -> bool {
        self.overflow.raised()
            || (matches!(failure, crate::runtime::invoke::Failure::Deadline(_))
                && self.waiting.raised())
    }
}

/// A request body that counts its bytes and fails once they pass `max`.
pub struct Metered<B> {
    inner: B,
    max: u64,
    seen: u64,
    state: RequestBody,
}

impl<B> Metered<B> {
    pub fn new(inner: B, max: u64, state: RequestBody) -> Self {
        Self {
            inner,
            max,
            seen: 0,
            state,
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.state.waiting.set(polled.is_pending());
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.max {
                        this.state.overflow.raise();
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

/// A response body that ends in an error, instead of its end, once `flag` is raised: the
/// request body passed its limit, or the instance writing the body failed. Either way
/// what the client got must not look whole.
pub struct CutOff<B> {
    inner: B,
    flag: Flag,
    why: &'static str,
}

impl<B> CutOff<B> {
    pub fn new(inner: B, flag: Flag, why: &'static str) -> Self {
        Self { inner, flag, why }
    }
}

/// The error a cut-off response ends with.
#[derive(Debug, thiserror::Error)]
#[error("the response was cut off: {0}")]
pub struct BodyCutOff(&'static str);

impl<B> Body for CutOff<B>
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
        if this.flag.raised() {
            return Poll::Ready(Some(Err(Box::new(BodyCutOff(this.why)))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) if this.flag.raised() => {
                Poll::Ready(Some(Err(Box::new(BodyCutOff(this.why)))))
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

/// A response body that ends only once the instance writing it has ended, and ends in an
/// error instead if the instance failed (at any point: `failed` is raised as it fails, the
/// outcome on `ended` covers a failure after the last byte). So a client that has the
/// whole body knows the call is over: its instance is back in its warm pool or gone.
///
/// With a declared length the client is done at the last byte, not at the body's end:
/// the frame that completes the length is held back (and the inner body still drained,
/// trailers and all, so the guest can finish) until the instance's outcome is known.
pub struct EndsWithInstance<B> {
    inner: B,
    inner_done: bool,
    failed: Flag,
    /// The instance's outcome (true: clean); `None` once it ended cleanly.
    ended: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// Bytes of the declared `content-length` still to come.
    remaining: Option<u64>,
    /// Frames held back until the outcome is known.
    held: std::collections::VecDeque<Frame<Bytes>>,
    holding: bool,
}

impl<B> EndsWithInstance<B> {
    pub fn new(
        inner: B,
        declared_length: Option<u64>,
        failed: Flag,
        ended: tokio::sync::oneshot::Receiver<bool>,
    ) -> Self {
        Self {
            inner,
            inner_done: false,
            failed,
            ended: Some(ended),
            remaining: declared_length,
            held: Default::default(),
            holding: false,
        }
    }
}

const INSTANCE_FAILED: &str = "the component failed while writing it";

fn instance_failed<T>() -> Poll<Option<Result<T, crate::capabilities::outbound::BoxError>>> {
    Poll::Ready(Some(Err(Box::new(BodyCutOff(INSTANCE_FAILED)))))
}

impl<B> Body for EndsWithInstance<B>
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
        if this.failed.raised() {
            return instance_failed();
        }
        loop {
            let Some(ended) = this.ended.as_mut() else {
                // The instance ended cleanly: what was held, then the rest.
                if let Some(frame) = this.held.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if this.inner_done {
                    return Poll::Ready(None);
                }
                return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
            };
            if !this.holding {
                match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => {
                        this.inner_done = true;
                        this.holding = true;
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        let completes = match (frame.data_ref(), this.remaining.as_mut()) {
                            (Some(data), Some(remaining)) => {
                                *remaining = remaining.saturating_sub(data.len() as u64);
                                *remaining == 0
                            }
                            _ => false,
                        };
                        if !completes {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        this.held.push_back(frame);
                        this.holding = true;
                    }
                }
                continue;
            }
            // Holding: keep draining the inner body (the guest may be writing trailers)
            // while waiting for the outcome.
            if !this.inner_done {
                match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        this.held.push_back(frame);
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => this.inner_done = true,
                    Poll::Pending => {}
                }
            }
            match Pin::new(ended).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(true)) => this.ended = None,
                // Failed, or went away without saying.
                Poll::Ready(_) => return instance_failed(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
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
        let state = RequestBody::default();
        let small = Metered::new(
            Full::new(Bytes::from_static(b"12345")).map_err(never),
            5,
            state.clone(),
        );
        assert_eq!(small.collect().await.unwrap().to_bytes().len(), 5);
        assert!(!state.overflow.raised());

        let large = Metered::new(
            Full::new(Bytes::from_static(b"123456")).map_err(never),
            5,
            state.clone(),
        );
        assert!(large.collect().await.is_err());
        assert!(state.overflow.raised());
    }
}
