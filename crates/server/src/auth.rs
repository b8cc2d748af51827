//! Who a caller is, and what it may do. Authentication happens before a
//! request's body is read (in `AdmissionLayer` for gRPC, in a middleware for
//! Feast's HTTP API): a bearer token in `authorization`, compared as a
//! SHA-256 hash in constant time against every principal's, or, under
//! mutual TLS, the name in the client certificate. Authorization happens
//! once the request is decoded and names its views: each principal has the
//! views it may read and those it may write or delete.
//!
//! No token is ever logged, counted or echoed: failures are counted by
//! reason, and a message names at most the principal.

use std::collections::HashSet;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::codegen::http;

/// The header that carries `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Views a principal may use: all of them, or those named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Views {
    All,
    Only(HashSet<String>),
}

impl Views {
    /// `["*"]` is every view; any other list, the views it names.
    pub fn from_list(names: &[String]) -> Views {
        if names.iter().any(|n| n == "*") { Views::All } else { Views::Only(names.iter().cloned().collect()) }
    }

    fn contains(&self, view: &str) -> bool {
        match self {
            Views::All => true,
            Views::Only(names) => names.contains(view),
        }
    }
}

/// A caller known to the server.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub read: Views,
    /// Views it may write and delete.
    pub write: Views,
    /// Its rate limit (0: none), which replaces `x-client-id`'s.
    pub per_second: u32,
    pub burst: u32,
}

/// Never prints a credential: a principal is its name and permissions.
impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .field("read", &self.read)
            .field("write", &self.write)
            .finish()
    }
}

/// How a principal proves who it is.
#[derive(Clone)]
pub enum Credential {
    /// The SHA-256 of its bearer token.
    TokenHash([u8; 32]),
    /// The name its client certificate carries (a DNS name of its
    /// subject alternative names, or else its subject's common name),
    /// accepted only from a certificate the client CA signed.
    CertificateName(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::TokenHash(_) => f.write_str("TokenHash(<redacted>)"),
            Credential::CertificateName(name) => f.debug_tuple("CertificateName").field(name).finish(),
        }
    }
}

/// Who is calling, once authenticated.
#[derive(Clone, Debug)]
pub enum Access {
    /// Authentication is off: every caller may do everything.
    Open,
    Principal(Arc<Principal>),
    /// A request that did not pass authentication (none that reaches a
    /// service should): it may do nothing.
    Nobody,
}

/// What a request tried to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
}

/// A principal used a view it may not use.
#[derive(Debug, Clone, thiserror::Error)]
#[error("principal {principal:?} may not {} view {view}", match .operation { Operation::Read => "read", Operation::Write => "write or delete in" })]
pub struct Denied {
    pub principal: String,
    pub operation: Operation,
    pub view: String,
}

impl Access {
    /// Whether this caller may read (or write and delete in) `view`.
    pub fn check(&self, operation: Operation, view: &str) -> Result<(), Denied> {
        let principal = match self {
            Access::Open => return Ok(()),
            Access::Principal(principal) => principal,
            Access::Nobody => {
                return Err(Denied {
                    principal: "(unauthenticated)".into(),
                    operation,
                    view: strata_proto::echo(view),
                });
            }
        };
        let views = match operation {
            Operation::Read => &principal.read,
            Operation::Write => &principal.write,
        };
        if views.contains(view) {
            return Ok(());
        }
        let reason = match operation {
            Operation::Read => "read_denied",
            Operation::Write => "write_denied",
        };
        metrics::counter!("strata_auth_refusals_total", "reason" => reason).increment(1);
        Err(Denied { principal: principal.name.clone(), operation, view: strata_proto::echo(view) })
    }

    /// Whether this caller may use `view` so, without counting a refusal
    /// (for listings).
    pub fn may(&self, operation: Operation, view: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Nobody => false,
            Access::Principal(p) => match operation {
                Operation::Read => p.read.contains(view),
                Operation::Write => p.write.contains(view),
            },
        }
    }

    /// The principal, if authentication is on.
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Access::Open | Access::Nobody => None,
            Access::Principal(p) => Some(p),
        }
    }

    /// The access an authenticated request carries in its extensions.
    pub fn of(extensions: &http::Extensions) -> Access {
        extensions.get::<Access>().cloned().unwrap_or(Access::Nobody)
    }
}

/// Why a caller could not be authenticated; the `reason` label of
/// `strata_auth_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No `authorization` header and no client certificate.
    Missing,
    /// An `authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A token no principal has.
    UnknownToken,
    /// A client certificate whose name no principal has.
    UnknownCertificate,
}

impl Unauthenticated {
    pub fn label(self) -> &'static str {
        match self {
            Unauthenticated::Missing => "missing_credential",
            Unauthenticated::Malformed => "malformed_credential",
            Unauthenticated::UnknownToken => "unknown_token",
            Unauthenticated::UnknownCertificate => "unknown_certificate",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Unauthenticated::Missing => "authentication is required: send `authorization: Bearer <token>`",
            Unauthenticated::Malformed => "the authorization header must be `Bearer <token>`",
            Unauthenticated::UnknownToken => "the bearer token is not valid",
            Unauthenticated::UnknownCertificate => "the client certificate names no principal",
        }
    }

    pub fn status(self) -> Status {
        Status::unauthenticated(self.message())
    }
}

/// The principals of a server, and whether callers must be one.
pub struct Authenticator {
    required: bool,
    tokens: Vec<([u8; 32], Arc<Principal>)>,
    certificates: Vec<(String, Arc<Principal>)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("required", &self.required)
            .field("principals", &(self.tokens.len() + self.certificates.len()))
            .finish()
    }
}

/// The SHA-256 of a token, as `auth.principals[].token_sha256` holds it.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new token: 32 random bytes, base64url.
pub fn new_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Authenticator {
    /// Nobody needs to authenticate.
    pub fn open() -> Authenticator {
        Authenticator { required: false, tokens: Vec::new(), certificates: Vec::new() }
    }

    pub fn new(principals: Vec<(Principal, Vec<Credential>)>) -> Authenticator {
        let mut tokens = Vec::new();
        let mut certificates = Vec::new();
        for (principal, credentials) in principals {
            let principal = Arc::new(principal);
            for credential in credentials {
                match credential {
                    Credential::TokenHash(hash) => tokens.push((hash, principal.clone())),
                    Credential::CertificateName(name) => certificates.push((name, principal.clone())),
                }
            }
        }
        Authenticator { required: true, tokens, certificates }
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// The principals' rate limits, by name.
    pub fn principals(&self) -> Vec<Arc<Principal>> {
        let mut all: Vec<Arc<Principal>> =
            self.tokens.iter().map(|(_, p)| p).chain(self.certificates.iter().map(|(_, p)| p)).cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.dedup_by(|a, b| a.name == b.name);
        all
    }

    /// Who sent a request with this `authorization` header (raw bytes), over
    /// a connection whose client certificate named `certificate` (mutual
    /// TLS). A token, when sent, decides; else the certificate.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        certificate: Option<&str>,
    ) -> Result<Access, Unauthenticated> {
        if !self.required {
            return Ok(Access::Open);
        }
        let result = match (authorization, certificate) {
            (Some(header), _) => self.by_token(header),
            (None, Some(name)) => self
                .certificates
                .iter()
                .find(|(known, _)| known == name)
                .map(|(_, p)| Access::Principal(p.clone()))
                .ok_or(Unauthenticated::UnknownCertificate),
            (None, None) => Err(Unauthenticated::Missing),
        };
        if let Err(reason) = result {
            metrics::counter!("strata_auth_refusals_total", "reason" => reason.label()).increment(1);
        }
        result
    }

    fn by_token(&self, header: &[u8]) -> Result<Access, Unauthenticated> {
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(Unauthenticated::Malformed)?;
        let hash = token_hash(token);
        // Every hash is compared, each in constant time: neither which
        // principal matched nor how much of a hash did shows in the time.
        let mut found = None;
        for (known, principal) in &self.tokens {
            if bool::from(known.ct_eq(&hash)) {
                found = Some(principal.clone());
            }
        }
        found.map(Access::Principal).ok_or(Unauthenticated::UnknownToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(name: &str, read: &[&str], write: &[&str]) -> Principal {
        let list = |names: &[&str]| Views::from_list(&names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>());
        Principal { name: name.into(), read: list(read), write: list(write), per_second: 0, burst: 0 }
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(vec![
            (principal("ranker", &["users"], &[]), vec![Credential::TokenHash(token_hash("s3cret"))]),
            (
                principal("pipeline", &["*"], &["*"]),
                vec![Credential::TokenHash(token_hash("other")), Credential::CertificateName("pipeline.svc".into())],
            ),
        ])
    }

    #[test]
    fn a_bearer_token_names_its_principal_and_anything_else_is_refused() {
        let auth = authenticator();
        let who = |h: &str| auth.authenticate(Some(h.as_bytes()), None).map(|a| a.principal().unwrap().name.clone());
        assert_eq!(who("Bearer s3cret").unwrap(), "ranker");
        assert_eq!(who("bearer other").unwrap(), "pipeline");
        assert_eq!(who("Bearer wrong").unwrap_err(), Unauthenticated::UnknownToken);
        assert_eq!(who("s3cret").unwrap_err(), Unauthenticated::Malformed);
        assert_eq!(who("Basic s3cret").unwrap_err(), Unauthenticated::Malformed);
        assert_eq!(who("Bearer ").unwrap_err(), Unauthenticated::Malformed);
        assert_eq!(auth.authenticate(None, None).unwrap_err(), Unauthenticated::Missing);
        assert!(!Unauthenticated::UnknownToken.message().contains("s3cret"));
    }

    #[test]
    fn a_client_certificate_names_its_principal_unless_a_token_is_sent() {
        let auth = authenticator();
        let access = auth.authenticate(None, Some("pipeline.svc")).unwrap();
        assert_eq!(access.principal().unwrap().name, "pipeline");
        assert_eq!(auth.authenticate(None, Some("stranger")).unwrap_err(), Unauthenticated::UnknownCertificate);
        let access = auth.authenticate(Some(b"Bearer s3cret"), Some("pipeline.svc")).unwrap();
        assert_eq!(access.principal().unwrap().name, "ranker");
    }

    #[test]
    fn permissions_are_per_view_and_per_operation() {
        let auth = authenticator();
        let ranker = auth.authenticate(Some(b"Bearer s3cret"), None).unwrap();
        assert!(ranker.check(Operation::Read, "users").is_ok());
        let denied = ranker.check(Operation::Read, "items").unwrap_err();
        assert_eq!(denied.to_string(), "principal \"ranker\" may not read view \"items\"");
        assert!(ranker.check(Operation::Write, "users").is_err());
        let pipeline = auth.authenticate(Some(b"Bearer other"), None).unwrap();
        assert!(pipeline.check(Operation::Write, "anything").is_ok());
        assert!(Access::Open.check(Operation::Write, "anything").is_ok());
        assert!(Authenticator::open().authenticate(None, None).is_ok());
    }

    #[test]
    fn debug_output_shows_no_credential() {
        let hash = token_hash("s3cret");
        let printed = format!("{:?} {:?}", Credential::TokenHash(hash), authenticator());
        assert!(!printed.contains(&hex(&hash)) && !printed.contains("s3cret"), "{printed}");
    }
}
