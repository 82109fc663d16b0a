//! `GET /v1/models`: the models of every ready endpoint, merged by id, plus the names
//! clients may ask for through an InferenceModelRewrite or a legacy InferenceModel.
//!
//! Each endpoint is asked concurrently with a short timeout; an endpoint that fails is left
//! out (and logged at debug). The merged list is cached for `models_cache_ttl`, so a client
//! polling it does not multiply into N upstream requests each time.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::relay::ResponseBody;
use crate::{error_chain, error_response, json_response, Gateway};

/// Model lists larger than this are not read.
const MAX_LIST_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct ModelsCache {
    cached: Mutex<Option<(Instant, Bytes)>>,
    /// One refresh at a time; others wait for its result.
    refreshing: tokio::sync::Mutex<()>,
}

pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<ResponseBody> {
    if let Some(keys) = &gw.cfg.api_keys {
        if let Err(message) = crate::proxy::authorize(keys, req.headers()) {
            let mut r = error_response(StatusCode::UNAUTHORIZED, message);
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    json_response(StatusCode::OK, list(&gw).await)
}

async fn list(gw: &Gateway) -> Bytes {
    let fresh = |c: &Option<(Instant, Bytes)>| {
        c.as_ref()
            .filter(|(at, _)| at.elapsed() < gw.cfg.models_cache_ttl)
            .map(|(_, b)| b.clone())
    };
    if let Some(b) = fresh(&gw.models.cached.lock()) {
        return b;
    }
    let _one = gw.models.refreshing.lock().await;
    if let Some(b) = fresh(&gw.models.cached.lock()) {
        return b;
    }
    let snap = gw.datastore.snapshot();
    let lists =
        futures::future::join_all(snap.endpoints.iter().map(|e| fetch(gw, e.spec.addr))).await;
    let mut seen = HashSet::new();
    let mut data = Vec::new();
    for model in lists.into_iter().flatten() {
        let id = model.get("id").and_then(Value::as_str).map(str::to_string);
        if let Some(id) = id {
            if seen.insert(id) {
                data.push(model);
            }
        }
    }
    // Names that exist only in the pool's policy: rewrite sources and legacy InferenceModels.
    let mut virtual_names: Vec<&str> = snap
        .rewrites
        .iter()
        .flat_map(|r| &r.rules)
        .flat_map(|r| r.matches.iter().map(String::as_str))
        .chain(snap.model_priorities.keys().map(String::as_str))
        .collect();
    virtual_names.sort_unstable();
    for name in virtual_names {
        if seen.insert(name.to_string()) {
            data.push(
                json!({"id": name, "object": "model", "created": 0, "owned_by": "infergate"}),
            );
        }
    }
    let body = Bytes::from(json!({"object": "list", "data": data}).to_string());
    *gw.models.cached.lock() = Some((Instant::now(), body.clone()));
    body
}

/// The `data` entries of one endpoint's `/v1/models`; empty on any failure.
async fn fetch(gw: &Gateway, addr: SocketAddr) -> Vec<Value> {
    let result = tokio::time::timeout(gw.cfg.models_timeout, async {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = format!("http://{addr}/v1/models")
            .parse()
            .map_err(|e| format!("{e}"))?;
        if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
            req.headers_mut().insert(HOST, host);
        }
        let resp = gw.client.request(req).await.map_err(|e| error_chain(&e))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .map_err(|e| error_chain(&*e))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("data") {
            Some(Value::Array(items)) => Ok(items.clone()),
            _ => Err("no `data` array".to_string()),
        }
    })
    .await;
    match result {
        Ok(Ok(items)) => items,
        Ok(Err(e)) => {
            tracing::debug!(endpoint = %addr, error = %e, "model list left out");
            Vec::new()
        }
        Err(_) => {
            tracing::debug!(endpoint = %addr, "model list left out: timed out");
            Vec::new()
        }
    }
}
