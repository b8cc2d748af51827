//! Admission of FeatureStore requests, decided before any work is done:
//! refused while the server drains, per-client token-bucket rate limits,
//! and a global cap on requests in flight. Every refusal is immediate (no
//! queue, so an overloaded server answers "no" in microseconds instead of
//! "yes" too late) and a gRPC status naming the reason. [`AdmissionLayer`]
//! asks before the request body is read or decoded, so the memory of
//! requests being decoded is bounded by `max_in_flight` times the request
//! size limit, whatever a flood of large requests sends; health checks and
//! reflection are never refused: a probe must see the truth under load.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::auth::{AUTHORIZATION, Access, Authenticator};
use crate::listener::Peer;

/// The request header in which a client names itself.
pub const CLIENT_ID_HEADER: &str = "x-client-id";
/// Longest client id accepted; longer ids are refused.
pub const MAX_CLIENT_ID_BYTES: usize = 128;
/// Unlisted clients with a bucket of their own at most, so a stream of
/// made-up ids cannot grow memory without bound. While that many are
/// tracked, unlisted clients are admitted without a bucket (the in-flight
/// cap still holds) until idle buckets are forgotten, about a second later:
/// a client that rotates ids escapes rate limits (ids are self-asserted
/// until authentication names the principal), but never throttles anyone
/// else, as one shared overflow bucket would.
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// Rate limits as configured: `per_second` and `burst` for any client not
/// listed (0: unlimited), and per-client overrides.
#[derive(Clone, Debug, Default)]
pub struct RateLimits {
    pub per_second: u32,
    pub burst: u32,
    pub clients: Vec<ClientLimit>,
}

#[derive(Clone, Debug)]
pub struct ClientLimit {
    pub id: String,
    /// 0: unlimited.
    pub per_second: u32,
    /// Requests allowed at once after a quiet time; 0 means `per_second`.
    pub burst: u32,
}

fn quota(per_second: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// Why a request was refused; the `reason` label of
/// `strata_requests_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Draining,
    RateLimited,
    Overloaded,
    BadClientId,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::RateLimited => "rate_limited",
            Refusal::Overloaded => "overloaded",
            Refusal::BadClientId => "bad_client_id",
        }
    }
}

/// The shared admission state of one server.
pub struct Admission {
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    /// Listed clients, each with its own bucket (`None`: unlimited).
    named: HashMap<String, Option<DefaultDirectRateLimiter>>,
    /// Every other client, one bucket per id (`None`: unlimited).
    others: Option<DefaultKeyedRateLimiter<String>>,
    draining: AtomicBool,
}

impl Admission {
    /// With authentication on, each principal's limit is a bucket of its
    /// own, chosen by the principal's name (see [`Admission::admit_access`]).
    pub fn new(max_in_flight: usize, limits: &RateLimits, auth: &Authenticator) -> Arc<Admission> {
        let named = limits
            .clients
            .iter()
            .map(|c| (c.id.clone(), quota(c.per_second, c.burst).map(RateLimiter::direct)))
            .chain(
                auth.principals()
                    .iter()
                    .map(|p| (p.name.clone(), quota(p.per_second, p.burst).map(RateLimiter::direct))),
            )
            .collect();
        Arc::new(Admission {
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            named,
            others: quota(limits.per_second, limits.burst).map(RateLimiter::keyed),
            draining: AtomicBool::new(false),
        })
    }

    /// From now on, every new request is refused with UNAVAILABLE; those
    /// in flight go on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`Admission::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Forgets the buckets of unlisted clients that are full again, so
    /// that a stream of new client ids cannot grow memory without bound.
    /// Called now and then.
    pub fn forget_idle_clients(&self) {
        if let Some(others) = &self.others {
            others.retain_recent();
            others.shrink_to_fit();
        }
    }

    /// Admits a request of an authenticated caller: with authentication
    /// on, its principal's bucket decides, whatever `x-client-id` says.
    pub fn admit_access(
        &self,
        access: &Access,
        client_header: Option<&[u8]>,
    ) -> Result<OwnedSemaphorePermit, (Refusal, Status)> {
        match access.principal() {
            Some(principal) => self.admit(Some(principal.name.as_bytes())),
            None => self.admit(client_header),
        }
    }

    /// Admits a request of `client` (the header's value, if any), or says
    /// why not. The permit is held until the response is ready.
    pub fn admit(&self, client: Option<&[u8]>) -> Result<OwnedSemaphorePermit, (Refusal, Status)> {
        let result = self.decide(client);
        if let Err((refusal, _)) = &result {
            metrics::counter!("strata_requests_refused_total", "reason" => refusal.label()).increment(1);
        }
        result
    }

    fn decide(&self, client: Option<&[u8]>) -> Result<OwnedSemaphorePermit, (Refusal, Status)> {
        if self.draining.load(Ordering::SeqCst) {
            return Err((Refusal::Draining, Status::unavailable("the server is shutting down; retry on another")));
        }
        let client = match client.map(std::str::from_utf8) {
            None => "",
            Some(Ok(id)) if id.len() <= MAX_CLIENT_ID_BYTES => id,
            Some(_) => {
                return Err((
                    Refusal::BadClientId,
                    Status::invalid_argument(format!(
                        "{CLIENT_ID_HEADER} must be UTF-8 of at most {MAX_CLIENT_ID_BYTES} bytes"
                    )),
                ));
            }
        };
        // The cap first: a request shed for overload does not spend its
        // client's tokens.
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            (
                Refusal::Overloaded,
                Status::resource_exhausted(format!(
                    "the server is at its limit of {} requests in flight; retry with backoff",
                    self.max_in_flight
                )),
            )
        })?;
        let limited = match self.named.get(client) {
            Some(Some(bucket)) => bucket.check().is_err(),
            Some(None) => false,
            None => self.others.as_ref().is_some_and(|buckets| {
                buckets.len() < MAX_TRACKED_CLIENTS && buckets.check_key(&client.to_owned()).is_err()
            }),
        };
        if limited {
            let who = if client.is_empty() {
                "requests without x-client-id".to_owned()
            } else {
                format!("client {client:?}")
            };
            return Err((
                Refusal::RateLimited,
                Status::resource_exhausted(format!("{who} is over its rate limit; slow down and retry")),
            ));
        }
        Ok(permit)
    }
}

/// Authenticates and admits FeatureStore and Feast calls before their
/// bodies are read (see the module docs): a refusal is answered at once as
/// a trailers-only gRPC status; an admitted call carries its [`Access`] in
/// its extensions, for the service to check per view, and holds its permit
/// until its response is ready.
#[derive(Clone)]
pub struct AdmissionLayer {
    admission: Arc<Admission>,
    auth: Arc<Authenticator>,
}

impl AdmissionLayer {
    pub fn new(admission: Arc<Admission>, auth: Arc<Authenticator>) -> AdmissionLayer {
        AdmissionLayer { admission, auth }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admitted<S>;

    fn layer(&self, inner: S) -> Admitted<S> {
        Admitted { inner, admission: self.admission.clone(), auth: self.auth.clone() }
    }
}

#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Arc<Admission>,
    auth: Arc<Authenticator>,
}

/// The path prefixes of the calls admission decides on: Strata's API and
/// Feast's gRPC services (health and reflection are always answered).
const ADMITTED_PREFIXES: [&str; 3] =
    ["/strata.v1.FeatureStore/", "/feast.serving.ServingService/", "/GrpcFeatureServer/"];

impl<S, B, R> tower::Service<http::Request<B>> for Admitted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let permit = if ADMITTED_PREFIXES.iter().any(|prefix| request.uri().path().starts_with(prefix)) {
            let authorization = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
            let certificate = request.extensions().get::<Peer>().and_then(|p| p.certificate.as_deref());
            let access = match self.auth.authenticate(authorization, certificate) {
                Ok(access) => access,
                Err(reason) => return Box::pin(std::future::ready(Ok(reason.status().into_http()))),
            };
            let client = request.headers().get(CLIENT_ID_HEADER).map(|v| v.as_bytes());
            let permit = match self.admission.admit_access(&access, client) {
                Ok(permit) => permit,
                Err((_, status)) => return Box::pin(std::future::ready(Ok(status.into_http()))),
            };
            request.extensions_mut().insert(access);
            Some(permit)
        } else {
            None
        };
        // The service that was polled ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let _permit = permit;
            inner.call(request).await
        })
    }
}

use tonic::codegen::http;

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(clients: Vec<ClientLimit>) -> RateLimits {
        // One token a second: no refill happens during a test.
        RateLimits { per_second: 1, burst: 2, clients }
    }

    #[test]
    fn a_client_over_its_burst_is_refused_and_others_are_not_affected() {
        let admission = Admission::new(100, &limits(Vec::new()), &Authenticator::open());
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(admission.admit(Some(b"a")).expect("within the burst"));
        }
        let (refusal, status) = admission.admit(Some(b"a")).unwrap_err();
        assert_eq!(refusal, Refusal::RateLimited);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("\"a\""), "{}", status.message());
        assert!(admission.admit(Some(b"b")).is_ok(), "each client has its own bucket");
    }

    #[test]
    fn listed_clients_get_their_own_limit_or_none() {
        let admission = Admission::new(
            100,
            &limits(vec![
                ClientLimit { id: "big".into(), per_second: 1, burst: 10 },
                ClientLimit { id: "free".into(), per_second: 0, burst: 0 },
            ]),
            &Authenticator::open(),
        );
        for _ in 0..10 {
            drop(admission.admit(Some(b"big")).expect("within its own burst"));
        }
        assert!(admission.admit(Some(b"big")).is_err());
        for _ in 0..1_000 {
            drop(admission.admit(Some(b"free")).expect("unlimited"));
        }
    }

    #[test]
    fn requests_over_the_in_flight_cap_are_refused_until_one_finishes() {
        let admission = Admission::new(2, &RateLimits::default(), &Authenticator::open());
        let first = admission.admit(None).unwrap();
        let _second = admission.admit(None).unwrap();
        assert_eq!(admission.in_flight(), 2);
        let (refusal, status) = admission.admit(None).unwrap_err();
        assert_eq!((refusal, status.code()), (Refusal::Overloaded, tonic::Code::ResourceExhausted));
        drop(first);
        assert!(admission.admit(None).is_ok());
    }

    #[test]
    fn a_draining_server_refuses_new_work_as_unavailable() {
        let admission = Admission::new(2, &RateLimits::default(), &Authenticator::open());
        admission.drain();
        let (refusal, status) = admission.admit(None).unwrap_err();
        assert_eq!((refusal, status.code()), (Refusal::Draining, tonic::Code::Unavailable));
    }

    #[test]
    fn with_authentication_the_principal_not_the_client_id_picks_the_bucket() {
        use crate::auth::{Credential, Principal, Views, token_hash};
        let ranker = Principal { name: "ranker".into(), read: Views::All, write: Views::All, per_second: 1, burst: 1 };
        let auth = Authenticator::new(vec![(ranker, vec![Credential::TokenHash(token_hash("t"))])]);
        let admission = Admission::new(100, &RateLimits::default(), &auth);
        let access = auth.authenticate(Some(b"Bearer t"), None).unwrap();
        drop(admission.admit_access(&access, Some(b"a")).expect("within its burst"));
        let (refusal, status) = admission.admit_access(&access, Some(b"b")).unwrap_err();
        assert_eq!(refusal, Refusal::RateLimited, "a new x-client-id is no new bucket");
        assert!(status.message().contains("ranker"), "{}", status.message());
    }

    #[test]
    fn an_oversized_client_id_is_invalid() {
        let admission = Admission::new(2, &RateLimits::default(), &Authenticator::open());
        let long = vec![b'x'; MAX_CLIENT_ID_BYTES + 1];
        let (_, status) = admission.admit(Some(&long)).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(CLIENT_ID_HEADER));
    }
}
