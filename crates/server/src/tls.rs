//! TLS for the front ends, with rustls: the certificate chain and key from
//! files, and optionally a client CA whose certificates every client must
//! present (mutual TLS). The files are checked every `tls.reload_every` and
//! reloaded when they change (Kubernetes rewrites a mounted Secret in
//! place): new handshakes use the new files, connections already open keep
//! theirs. Files that fail to load leave the previous ones in use, loudly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// Where a front end's certificate, key and (for mutual TLS) client CA are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// The TLS settings of one listener, reloaded when its files change.
pub struct Tls {
    files: TlsFiles,
    /// The ALPN protocols the listener speaks (`h2` for gRPC).
    alpn: Vec<Vec<u8>>,
    current: RwLock<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    /// What the files looked like when loaded: reloaded when it changes.
    stamp: Vec<Option<(SystemTime, u64)>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles, alpn: &[&[u8]]) -> Result<Arc<Tls>> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let stamp = stamp(&files);
        let acceptor = acceptor(&files, &alpn)?;
        Ok(Arc::new(Tls { files, alpn, current: RwLock::new(Loaded { acceptor, stamp }) }))
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|p| p.into_inner()).acceptor.clone()
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reloads the files if they changed since they were loaded. Returns
    /// whether a new configuration is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        if now == self.current.read().unwrap_or_else(|p| p.into_inner()).stamp {
            return false;
        }
        match acceptor(&self.files, &self.alpn) {
            Ok(acceptor) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Loaded { acceptor, stamp: now };
                tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate");
                metrics::counter!("strata_tls_reloads_total", "outcome" => "reloaded").increment(1);
                true
            }
            Err(error) => {
                // Written halfway, perhaps: tried again at the next check,
                // since the stamp is left as it was.
                tracing::error!(%error, "cannot reload the TLS files; keeping the ones in use");
                metrics::counter!("strata_tls_reloads_total", "outcome" => "failed").increment(1);
                false
            }
        }
    }

    /// Checks the files every `every` for as long as the returned task runs.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(tls) = tls.upgrade() else { return };
                tls.reload_if_changed();
            }
        })
    }
}

/// Modification time and length of each file; `None` for one that cannot
/// be read now.
fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file; at least one.
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The CA certificates of a PEM file, as roots to verify peers against.
pub(crate) fn roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).with_context(|| format!("{} holds a certificate that is not a CA", path.display()))?;
    }
    Ok(roots)
}

fn acceptor(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<TlsAcceptor> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("{} holds no PEM private key", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version available")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .with_context(|| format!("cannot verify clients with {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!("the key in {} does not fit the certificate in {}", files.key.display(), files.cert.display())
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The name a client certificate carries: its first DNS subject alternative
/// name, else its subject's common name.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(names)) = parsed.subject_alternative_name() {
        for name in &names.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Some((*dns).to_owned());
            }
        }
    }
    parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
}
