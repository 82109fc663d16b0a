//! A small HTTP client for tests: keep-alive pooled requests, whole-body and streaming.
//!
//! Built on hyper-util's legacy client. The free functions share one client per thread;
//! a pooled connection is driven by a task on the Tokio runtime that opened it, and a test
//! thread (or a runtime worker) only ever belongs to one runtime, so this never hands a
//! test a connection from a runtime that has already shut down.

use std::cell::RefCell;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A cheap-to-clone HTTP client with a keep-alive connection pool.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// An HTTP/1.1 client (what Envoy's listener and the fake model server both speak).
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            inner: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// A client that speaks HTTP/2 with prior knowledge (h2c).
    pub fn http2() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }

    /// Sends a request and returns the response with its body still to be read.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let uri = format!("{}{}", url.trim_end_matches('/'), path);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .body(Full::new(body))
            .with_context(|| format!("building request {method} {uri}"))?;
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("bad header name {name:?}"))?;
            let value = HeaderValue::from_str(value)
                .with_context(|| format!("bad value for header {name}"))?;
            req.headers_mut().append(name, value);
        }
        self.inner
            .request(req)
            .await
            .with_context(|| format!("{method} {uri}"))
    }

    /// POSTs `body` as `application/json` (unless `headers` names another content type) and
    /// reads the whole response.
    pub async fn post_json(
        &self,
        url: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
        let headers = with_json_content_type(headers);
        let resp = self
            .send(Method::POST, url, path, &headers, body.into())
            .await?;
        read_whole(resp).await
    }

    /// POSTs like [`HttpClient::post_json`] but hands back the body as it arrives.
    pub async fn post_json_stream(
        &self,
        url: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<(StatusCode, HeaderMap, ChunkStream)> {
        let headers = with_json_content_type(headers);
        let resp = self
            .send(Method::POST, url, path, &headers, body.into())
            .await?;
        let (parts, body) = resp.into_parts();
        Ok((parts.status, parts.headers, ChunkStream { body }))
    }

    /// GETs `path` and reads the whole response.
    pub async fn get(
        &self,
        url: &str,
        path: &str,
    ) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
        let resp = self.send(Method::GET, url, path, &[], Bytes::new()).await?;
        read_whole(resp).await
    }
}

fn with_json_content_type<'a>(headers: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut out = headers.to_vec();
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        out.push((CONTENT_TYPE.as_str(), "application/json"));
    }
    out
}

async fn read_whole(
    resp: hyper::Response<Incoming>,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .with_context(|| format!("reading response body (status {})", parts.status))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// A response body read frame by frame, in the pieces the connection delivered.
pub struct ChunkStream {
    body: Incoming,
}

impl ChunkStream {
    /// The next data chunk, `None` at the end. Trailers are skipped.
    pub async fn next_chunk(&mut self) -> Option<anyhow::Result<Bytes>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Some(Ok(data));
                        }
                    }
                }
                Err(e) => return Some(Err(anyhow::Error::new(e).context("reading body chunk"))),
            }
        }
    }

    /// Reads to the end and returns every chunk in arrival order.
    pub async fn collect_chunks(mut self) -> anyhow::Result<Vec<Bytes>> {
        let mut chunks = Vec::new();
        while let Some(chunk) = self.next_chunk().await {
            chunks.push(chunk?);
        }
        Ok(chunks)
    }

    /// Reads to the end and returns the chunks joined.
    pub async fn concat(self) -> anyhow::Result<Bytes> {
        let mut all = BytesMut::new();
        for chunk in self.collect_chunks().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }
}

thread_local! {
    static THREAD_CLIENT: RefCell<Option<HttpClient>> = const { RefCell::new(None) };
}

fn thread_client() -> HttpClient {
    THREAD_CLIENT.with(|c| c.borrow_mut().get_or_insert_with(HttpClient::new).clone())
}

/// POSTs JSON with this thread's pooled client; see [`HttpClient::post_json`].
pub async fn post_json(
    url: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    thread_client().post_json(url, path, headers, body).await
}

/// POSTs JSON and streams the response; see [`HttpClient::post_json_stream`].
pub async fn post_json_stream(
    url: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> anyhow::Result<(StatusCode, HeaderMap, ChunkStream)> {
    thread_client()
        .post_json_stream(url, path, headers, body)
        .await
}

/// GETs with this thread's pooled client; see [`HttpClient::get`].
pub async fn get(url: &str, path: &str) -> anyhow::Result<(StatusCode, HeaderMap, Bytes)> {
    thread_client().get(url, path).await
}
