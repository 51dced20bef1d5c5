//! lanup's HTTP clients (the origin, headquarters): which certificate
//! authorities they trust and which proxy they go through.
//!
//! Trusted: the operating system's store (on Linux what
//! `update-ca-certificates` installs, or `SSL_CERT_FILE` / `SSL_CERT_DIR`
//! where set; on Windows the machine's certificate store) plus the
//! authorities in `ca_file`, read when a client is made (the node's origin
//! client when the node starts: a changed authority needs a restart). Each
//! connection checks the server's certificate afresh, so a server
//! certificate renewed meanwhile is simply taken by the next connection.
//!
//! Proxy: `proxy` in the configuration when set (with `NO_PROXY` still
//! honoured), otherwise `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
//! `NO_PROXY` from the environment.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// How this process's HTTP clients trust and route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// A PEM file of certificate authorities trusted beside the system's.
    pub ca_file: Option<PathBuf>,
    /// `http://host:port` (credentials in the URL if the proxy wants
    /// them) for every request to the origin and headquarters.
    pub proxy: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets this process's HTTP settings, once, after checking them: the
/// `ca_file` must hold at least one certificate, the proxy must be an
/// http(s) URL. A second call with other settings is refused.
pub fn configure(settings: Settings) -> Result<()> {
    check(&settings)?;
    let set = SETTINGS.get_or_init(|| settings.clone());
    if *set != settings {
        bail!("this process's HTTP settings are already set to {set:?}");
    }
    Ok(())
}

/// Checks `settings` as [`configure`] would, without setting them.
pub fn check(settings: &Settings) -> Result<()> {
    if let Some(file) = &settings.ca_file {
        authorities(file)?;
    }
    if let Some(proxy) = &settings.proxy {
        proxy_for(proxy)?;
    }
    Ok(())
}

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

/// The certificate authorities in `file` (PEM).
fn authorities(file: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(file).with_context(|| format!("ca_file {}", file.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("ca_file {}: not PEM certificates", file.display()))?;
    if certs.is_empty() {
        bail!(
            "ca_file {}: no certificate in it (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")",
            file.display()
        );
    }
    Ok(certs)
}

fn proxy_for(url: &str) -> Result<reqwest::Proxy> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("proxy {url:?}: not an http:// or https:// URL");
    }
    let proxy = reqwest::Proxy::all(url).with_context(|| format!("proxy {url:?}"))?;
    Ok(proxy.no_proxy(reqwest::NoProxy::from_env()))
}

/// The authorities of `ca_file` and the proxy, as the settings name them.
fn trust_and_route() -> Result<(Vec<reqwest::Certificate>, Option<reqwest::Proxy>)> {
    let settings = settings();
    let authorities = match &settings.ca_file {
        Some(file) => authorities(file)?,
        None => Vec::new(),
    };
    let proxy = settings.proxy.as_deref().map(proxy_for).transpose()?;
    Ok((authorities, proxy))
}

/// A client builder with this process's trust and proxy.
pub fn builder() -> Result<reqwest::ClientBuilder> {
    let (authorities, proxy) = trust_and_route()?;
    let builder = authorities
        .into_iter()
        .fold(reqwest::Client::builder(), |b, cert| {
            b.add_root_certificate(cert)
        });
    Ok(match proxy {
        Some(proxy) => builder.proxy(proxy),
        None => builder,
    })
}

/// The blocking counterpart of [`builder`], for the CLI.
pub fn blocking_builder() -> Result<reqwest::blocking::ClientBuilder> {
    let (authorities, proxy) = trust_and_route()?;
    let builder = authorities
        .into_iter()
        .fold(reqwest::blocking::Client::builder(), |b, cert| {
            b.add_root_certificate(cert)
        });
    Ok(match proxy {
        Some(proxy) => builder.proxy(proxy),
        None => builder,
    })
}

/// What an operator should know when `error` (anywhere in its chain) is
/// a refused server certificate: the exact problem and the fix.
pub fn explain(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{CertificateError, Error};
    let mut next = Some(error);
    while let Some(e) = next {
        // The TLS error sits inside I/O errors (hyper's, inside the TLS
        // stream's), which `source` skips.
        let mut inner: &(dyn std::error::Error + 'static) = e;
        while let Some(io) = inner.downcast_ref::<std::io::Error>() {
            match io.get_ref() {
                Some(wrapped) => inner = wrapped,
                None => break,
            }
        }
        let tls = inner.downcast_ref::<Error>();
        if let Some(Error::InvalidCertificate(cert)) = tls {
            return Some(match cert {
                CertificateError::UnknownIssuer => "the server's certificate is signed by an authority this machine does not trust: add that authority to the system's trust store (update-ca-certificates; on Windows, the machine's certificate store) or name its certificate in ca_file".to_owned(),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!("the server's certificate has expired ({cert:?}): renew it on the server"),
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!("the server's certificate is not valid yet ({cert:?}): check this machine's clock"),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!("the server's certificate is not for this host name ({cert:?}): use the name the certificate was issued for"),
                CertificateError::Revoked => "the server's certificate is revoked".to_owned(),
                CertificateError::BadSignature => "the server's certificate has a bad signature".to_owned(),
                other => format!("the server's certificate is refused: {other:?}"),
            });
        }
        next = e.source();
    }
    None
}

/// `error` with [`explain`]'s words before it when it is a certificate
/// problem.
pub fn describe(error: &anyhow::Error) -> String {
    match error.chain().find_map(explain) {
        Some(why) => format!("{why} ({error:#})"),
        None => format!("{error:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_or_proxy_that_cannot_work_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let err = check(&Settings {
            ca_file: Some(missing.clone()),
            proxy: None,
        })
        .expect_err("refused");
        assert!(
            format!("{err:#}").contains(&missing.display().to_string()),
            "{err:#}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = check(&Settings {
            ca_file: Some(empty),
            proxy: None,
        })
        .expect_err("refused");
        assert!(
            format!("{err:#}").contains("no certificate in it"),
            "{err:#}"
        );
        for proxy in ["proxy.example.com:3128", "socks5://127.0.0.1:1080"] {
            let err = check(&Settings {
                ca_file: None,
                proxy: Some(proxy.into()),
            })
            .expect_err("refused");
            assert!(format!("{err:#}").contains(proxy), "{err:#}");
        }
        check(&Settings {
            ca_file: None,
            proxy: Some("http://user:pw@proxy:3128".into()),
        })
        .expect("an http proxy with credentials");
    }

    #[test]
    fn a_refused_certificate_is_named_however_deep_in_the_io_errors_it_sits() {
        use rustls::{CertificateError, Error};
        let wrap = |e: Error| {
            let tls = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            anyhow::Error::new(std::io::Error::other(tls)).context("cannot fetch https://origin/")
        };
        let unknown = describe(&wrap(Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        assert!(
            unknown.contains("does not trust") && unknown.contains("ca_file"),
            "{unknown}"
        );
        let expired = describe(&wrap(Error::InvalidCertificate(CertificateError::Expired)));
        assert!(expired.contains("has expired"), "{expired}");
        let name = describe(&wrap(Error::InvalidCertificate(
            CertificateError::NotValidForName,
        )));
        assert!(name.contains("not for this host name"), "{name}");
        let other = describe(&anyhow::anyhow!("connection refused"));
        assert_eq!(other, "connection refused");
    }
}
