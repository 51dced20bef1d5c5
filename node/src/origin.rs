//! The embedded origin: a static HTTP/1.1 server for a release directory,
//! with what lanup's fetcher relies on (Range requests, ETags), a count of
//! the bytes it served, and an optional cap on its total send rate so a
//! laptop can play a site's slow uplink.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use lanup_protocol::units::Rate;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio_util::io::ReaderStream;
use tracing::{debug, info};

use crate::throttle::Throttle;
use std::net::SocketAddr;

/// Path of the statistics endpoint.
pub const STATS_PATH: &str = "/_lanup/stats";

/// Bytes read from disk and sent per body write. Small enough that the rate
/// cap is smooth at a few hundred kbit/s, large enough to be cheap at
/// gigabit speeds.
const SEND_BLOCK: usize = 16 * 1024;

/// Counters behind `/_lanup/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    bytes_served: AtomicU64,
    requests: AtomicU64,
}

impl Stats {
    /// Body bytes sent to all clients so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served.load(Ordering::Relaxed)
    }

    /// File requests answered so far (the stats endpoint not counted).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

struct Shared {
    root: PathBuf,
    stats: Arc<Stats>,
    throttle: Throttle,
    rate: Option<Rate>,
}

/// A bound origin, ready to serve.
pub struct Origin {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// Routes served beside the release folder (headquarters').
    extra: Router,
}

impl Origin {
    /// Binds `listen` and prepares to serve `dir`, capped at `rate` in total
    /// across all clients when given.
    pub async fn bind(dir: &Path, listen: &str, rate: Option<Rate>) -> Result<Origin> {
        let root = std::fs::canonicalize(dir)
            .with_context(|| format!("origin folder {}", dir.display()))?;
        if !root.is_dir() {
            anyhow::bail!("origin folder {}: not a directory", root.display());
        }
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let throttle = Throttle::new(rate);
        Ok(Origin {
            listener,
            shared: Arc::new(Shared {
                root,
                stats: Arc::default(),
                throttle,
                rate,
            }),
            extra: Router::new(),
        })
    }

    /// Serves `routes` too, beside the release folder (headquarters'
    /// report intake and fleet view).
    pub fn with_routes(mut self, routes: Router) -> Origin {
        self.extra = self.extra.merge(routes);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let addr = self.listener.local_addr()?;
        info!(
            root = %self.shared.root.display(),
            %addr,
            rate = %self.shared.rate.map_or("uncapped".to_owned(), |r| r.to_string()),
            "origin serving release folder"
        );
        let app = Router::new()
            .route(STATS_PATH, get(stats))
            .fallback(serve_file)
            .with_state(self.shared)
            .merge(self.extra);
        axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .context("origin server failed")
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let s = &shared.stats;
    let body = serde_json::json!({
        "bytes_served": s.bytes_served(),
        "requests": s.requests(),
        "rate_bytes_per_sec": shared.rate.map(Rate::bytes_per_sec),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn serve_file(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "only GET and HEAD\n",
        )
            .into_response();
    }
    let Some(path) = resolve(&shared.root, req.uri().path()) else {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    };
    match respond(&shared, &path, &method, req.headers()).await {
        Ok(resp) => resp,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (StatusCode::NOT_FOUND, "not found\n").into_response()
        }
        Err(e) => {
            debug!(path = %path.display(), error = %e, "origin could not read file");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot read file\n").into_response()
        }
    }
}

/// Maps a request path to a file under `root`, or `None` when it would leave
/// `root`, by `..` or through a symbolic link.
fn resolve(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path)
        .decode_utf8()
        .ok()?;
    let mut path = root.to_path_buf();
    for part in decoded.split('/').filter(|p| !p.is_empty()) {
        if part.contains('\0') || part.contains('\\') {
            return None;
        }
        match Path::new(part).components().next() {
            Some(Component::Normal(_)) => path.push(part),
            _ => return None,
        }
    }
    let real = std::fs::canonicalize(&path).ok()?;
    real.starts_with(root).then_some(real)
}

/// A file's validator: its size and modification time.
fn etag_of(meta: &std::fs::Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    format!("\"{:x}-{:x}\"", meta.len(), mtime.as_nanos())
}

async fn respond(
    shared: &Arc<Shared>,
    path: &Path,
    method: &Method,
    headers: &HeaderMap,
) -> std::io::Result<Response> {
    let mut file = tokio::fs::File::open(path).await?;
    let meta = file.metadata().await?;
    if !meta.is_file() {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    let len = meta.len();
    let etag = etag_of(&meta);

    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if if_none_match(headers, &etag) {
        return Ok(builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default());
    }

    let mut start = 0;
    let mut count = len;
    let mut status = StatusCode::OK;
    if let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        // A Range header we cannot parse is ignored (RFC 9110 §14.2); one
        // that parses but lies outside the file is 416.
        if let Ok(parsed) = http_range_header::parse_range_header(range) {
            match parsed.validate(len) {
                Ok(ranges) if ranges.len() == 1 => {
                    start = *ranges[0].start();
                    count = ranges[0].end() - start + 1;
                    status = StatusCode::PARTIAL_CONTENT;
                    builder = builder.header(
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{}/{len}", ranges[0].end()),
                    );
                }
                // Several ranges: the whole file is a valid answer.
                Ok(_) => {}
                Err(_) => {
                    return Ok(builder
                        .status(StatusCode::RANGE_NOT_SATISFIABLE)
                        .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                        .body(Body::empty())
                        .unwrap_or_default());
                }
            }
        }
    }
    builder = builder
        .status(status)
        .header(header::CONTENT_LENGTH, HeaderValue::from(count));
    if *method == Method::HEAD {
        return Ok(builder.body(Body::empty()).unwrap_or_default());
    }
    file.seek(std::io::SeekFrom::Start(start)).await?;
    let shared = shared.clone();
    let stream = ReaderStream::with_capacity(file.take(count), SEND_BLOCK).then(move |block| {
        let shared = shared.clone();
        async move {
            let block = block?;
            shared.throttle.take(block.len()).await;
            shared
                .stats
                .bytes_served
                .fetch_add(block.len() as u64, Ordering::Relaxed);
            Ok::<_, std::io::Error>(block)
        }
    });
    Ok(builder.body(Body::from_stream(stream)).unwrap_or_default())
}

fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_leave_the_root() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let root = std::fs::canonicalize(dir.path())?;
        std::fs::create_dir(root.join("bin"))?;
        std::fs::write(root.join("bin/app"), b"x")?;
        std::fs::write(root.join("été.txt"), b"x")?;
        let outside = tempfile::tempdir()?;
        std::fs::write(outside.path().join("secret"), b"s")?;
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("link"))?;

        assert_eq!(resolve(&root, "/bin/app"), Some(root.join("bin/app")));
        assert_eq!(
            resolve(&root, "/%C3%A9t%C3%A9.txt"),
            Some(root.join("été.txt"))
        );
        assert_eq!(resolve(&root, "/../etc/passwd"), None);
        assert_eq!(resolve(&root, "/bin/%2E%2E/%2E%2E/etc/passwd"), None);
        assert_eq!(resolve(&root, "/bin/..%2F..%2Fetc"), None);
        assert_eq!(resolve(&root, "/bin%5C..%5Capp"), None);
        assert_eq!(resolve(&root, "/link"), None);
        Ok(())
    }
}
