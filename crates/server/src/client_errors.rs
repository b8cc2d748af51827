//! Statuses that tonic's codec gives for the client's own mistakes, made
//! to say so. A request over the size limit comes back from tonic as
//! OUT_OF_RANGE and a message that does not decode (a string field that is
//! not UTF-8, say) as INTERNAL, both before any handler runs; they are the
//! client's fault, so they become RESOURCE_EXHAUSTED and INVALID_ARGUMENT,
//! with a short message of Strata's, and never count as server errors.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http::{self, HeaderValue};

/// See the module docs.
#[derive(Clone, Copy, Debug)]
pub struct ClientErrorsLayer {
    /// `limits.max_request_bytes`, for the message.
    pub max_request_bytes: usize,
}

impl<S> tower::Layer<S> for ClientErrorsLayer {
    type Service = ClientErrors<S>;

    fn layer(&self, inner: S) -> ClientErrors<S> {
        ClientErrors { inner, max_request_bytes: self.max_request_bytes }
    }
}

#[derive(Clone, Debug)]
pub struct ClientErrors<S> {
    inner: S,
    max_request_bytes: usize,
}

/// gRPC status codes, as they appear in the `grpc-status` header.
const INVALID_ARGUMENT: &str = "3";
const RESOURCE_EXHAUSTED: &str = "8";
const OUT_OF_RANGE: &str = "11";
const INTERNAL: &str = "13";
/// How tonic's prost codec begins the message of a decode failure, and
/// how tonic words a request over the size limit, percent-encoded as the
/// `grpc-message` header carries them.
const DECODE_FAILURE: &str = "failed%20to%20decode%20Protobuf%20message";
const TOO_LARGE: &str = "message%20length%20too%20large";

impl<S, B, R> tower::Service<http::Request<B>> for ClientErrors<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The service that was polled ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.max_request_bytes;
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            rewrite(response.headers_mut(), limit);
            Ok(response)
        })
    }
}

/// Rewrites a trailers-only status (a unary call refused before its
/// handler: the status is in the headers) that is the client's fault.
fn rewrite(headers: &mut http::HeaderMap, max_request_bytes: usize) {
    let status = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
    let (code, text) = match status {
        Some(OUT_OF_RANGE) if message.contains(TOO_LARGE) => (
            RESOURCE_EXHAUSTED,
            format!("the request is larger than the limit of {max_request_bytes} bytes (limits.max_request_bytes)"),
        ),
        Some(INTERNAL) if message.starts_with(DECODE_FAILURE) => (
            INVALID_ARGUMENT,
            "the request is not a valid message: malformed protobuf, or a string field that is not UTF-8".to_owned(),
        ),
        _ => return,
    };
    headers.insert("grpc-status", HeaderValue::from_static(code));
    // Plain ASCII whose only character to percent-encode is the space.
    if let Ok(text) = HeaderValue::from_str(&text.replace(' ', "%20")) {
        headers.insert("grpc-message", text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &'static str, message: &'static str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static(status));
        headers.insert("grpc-message", HeaderValue::from_static(message));
        headers
    }

    fn code_and_message(headers: &http::HeaderMap) -> (&str, &str) {
        let get = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).unwrap_or("");
        (get("grpc-status"), get("grpc-message"))
    }

    #[test]
    fn an_oversized_request_is_resource_exhausted_naming_the_limit() {
        let mut h = headers("11", "Error,%20decoded%20message%20length%20too%20large:%20found%205242880%20bytes");
        rewrite(&mut h, 4_194_304);
        let (code, message) = code_and_message(&h);
        assert_eq!(code, "8");
        assert!(message.contains("4194304") && message.contains("limits.max_request_bytes"), "{message}");
    }

    #[test]
    fn an_undecodable_request_is_invalid_argument_and_other_statuses_stay() {
        let mut h = headers("13", "failed%20to%20decode%20Protobuf%20message:%20invalid%20string%20value");
        rewrite(&mut h, 1);
        assert_eq!(code_and_message(&h).0, "3");
        // A server's own INTERNAL is left alone.
        let mut h = headers("13", "none%20of%20the%202%20rows%20was%20written");
        rewrite(&mut h, 1);
        assert_eq!(code_and_message(&h), ("13", "none%20of%20the%202%20rows%20was%20written"));
    }
}
