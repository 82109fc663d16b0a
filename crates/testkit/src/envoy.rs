//! A real Envoy 1.40 for tests: finding or installing the binary, generating a GIE-style
//! gateway config, and running one Envoy process per test.
//!
//! The generated config is what a GIE gateway puts in front of a pool: an HTTP listener whose
//! ext_proc filter asks the endpoint picker, then a router with two routes. A request that
//! carries `x-gateway-destination-endpoint` (set by the picker, which also clears the route
//! cache so the route is chosen again) goes to an `ORIGINAL_DST` cluster that connects to
//! the address in that header. Any other request goes to a round-robin cluster of the pool's
//! endpoints, which is what a gateway does when the picker is down and the filter fails open.
//!
//! Both routes retry (by default twice) when a connection fails, is reset before the
//! response starts, or the server answers 503: see [`RetryPolicy`]. With the default
//! `ORIGINAL_DST` cluster a retry can only go back to the same address, because that cluster
//! connects to whatever the header names (and it reads the header as one address, so it
//! cannot take the picker's `primary,fallback,...` list either);
//! [`PickedCluster::OverrideHost`] instead routes over the pool's endpoints with Envoy's
//! `override_host` load-balancing policy, which tries the picker's primary first, then its
//! fallback endpoints in order on retries, then any other pool endpoint not tried yet.
//!
//! When the ext_proc exchange fails and the filter fails closed, Envoy's own answer is an
//! empty 500; the generated config gives it a JSON error body saying that the endpoint
//! picker is unavailable (and [`EnvoyConfig::status_on_error`] can make it a 503).
//!
//! Envoy reaches the picker over TLS without verifying its certificate by default, as GIE
//! gateways do with the reference picker's self-signed certificate.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

/// The header (and `envoy.lb` metadata key) naming the endpoint the picker chose.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// Room for 20 MB request bodies plus headroom, on the listener and every cluster.
const BUFFER_LIMIT_BYTES: u32 = 64 * 1024 * 1024;

/// The `error.type` of the body Envoy answers with when the ext_proc exchange fails.
pub const PICKER_UNAVAILABLE_TYPE: &str = "EndpointPickerUnavailable";

/// The HTTP connection manager's `local_reply_config`: a JSON body, in the picker's error
/// format, for the local replies of a failed ext_proc exchange (status unchanged).
const EXT_PROC_ERROR_REPLY: &str = r#"          local_reply_config:
            mappers:
            - filter:
                extension_filter:
                  name: envoy.access_loggers.extension_filters.cel
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter
                    expression: "response.code_details.startsWith('ext_proc_error')"
              body_format_override:
                content_type: application/json
                json_format:
                  error:
                    message: "the endpoint picker is unavailable, so the gateway could not choose a model server for this request; try again shortly"
                    type: EndpointPickerUnavailable
                    code: "%RESPONSE_CODE%"
                    details: "%RESPONSE_CODE_DETAILS%"
"#;

/// The upstream clusters' circuit breakers. Envoy allows only 3 retries in flight per
/// cluster by default (`max_retries`); a replica that dies with more requests than that in
/// flight, or new requests still picked for it, then overflows the limit
/// (`upstream_rq_retry_overflow`) and those clients get 503s. 1024 is Envoy Gateway's
/// default for every threshold; the others keep Envoy's defaults (1024 already).
const CIRCUIT_BREAKERS: &str = "    circuit_breakers: {thresholds: [{max_retries: 1024}]}\n";

/// How Envoy hands a request or response body to the ext_proc server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyMode {
    /// Chunks flow both ways as they come; what the GIE reference config uses.
    FullDuplexStreamed,
    /// Envoy buffers the whole body and sends it in one message (bounded by the buffer limit).
    Buffered,
    /// The body is not sent to the processor.
    None,
}

impl BodyMode {
    fn as_envoy(self) -> &'static str {
        match self {
            BodyMode::FullDuplexStreamed => "FULL_DUPLEX_STREAMED",
            BodyMode::Buffered => "BUFFERED",
            BodyMode::None => "NONE",
        }
    }

    /// Envoy refuses full-duplex body mode unless trailers are sent too.
    fn trailer_mode(self) -> &'static str {
        match self {
            BodyMode::FullDuplexStreamed => "SEND",
            _ => "SKIP",
        }
    }
}

/// How Envoy connects to the picker's gRPC port.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ExtProcTls {
    /// Plaintext HTTP/2, for a picker run with `--secure-serving=false`.
    Off,
    /// TLS without certificate verification: what gateways do by default.
    Unverified,
    /// TLS, verifying the picker's certificate chain against this PEM CA file.
    TrustedCa(PathBuf),
}

/// Which cluster serves a request that carries the picker's destination header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickedCluster {
    /// An `ORIGINAL_DST` cluster with `use_http_header`, as the GIE reference config and
    /// most gateways (kgateway, Envoy AI Gateway): it connects to any address the header
    /// names, but reads the header as ONE address (a `primary,fallback,...` list does not
    /// parse and the request fails with 503), and a retry goes back to that same address.
    OriginalDst,
    /// A cluster of the pool's endpoints with the `envoy.load_balancing_policies.override_host`
    /// policy reading the header: the first attempt goes to the picker's primary, each retry
    /// to its next fallback endpoint, and once they are used up (or when one is not in the
    /// pool) to a round-robin pick among the pool endpoints not tried yet. Only endpoints
    /// given to [`EnvoyConfig::pool`] can be reached. The host that served is put in the
    /// `envoy.lb` metadata as `x-gateway-destination-endpoint-served`.
    OverrideHost,
}

/// Envoy's route retry policy, on both routes. A retry is only possible before the response
/// has started (Envoy never retries once it has sent response headers to the client), so a
/// stream that breaks midway is still cut; what retries save are the requests in flight to
/// a replica that dies before answering, and connections refused by a dead one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Envoy's `num_retries`).
    pub retries: u32,
    /// Envoy's `retry_on` conditions, comma-separated.
    pub retry_on: String,
    /// The statuses retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Skip hosts already tried (the `previous_hosts` retry host predicate). It applies to
    /// round-robin picks: the pool fallback route, and the override-host cluster once the
    /// picker's endpoints are used up. An `ORIGINAL_DST` cluster ignores it.
    pub avoid_previous_hosts: bool,
}

impl Default for RetryPolicy {
    /// Two retries on `connect-failure,refused-stream,reset,retriable-status-codes` with 503
    /// retriable, avoiding hosts already tried.
    fn default() -> Self {
        RetryPolicy {
            retries: 2,
            retry_on: "connect-failure,refused-stream,reset,retriable-status-codes".to_owned(),
            retriable_status_codes: vec![503],
            avoid_previous_hosts: true,
        }
    }
}

impl RetryPolicy {
    /// The route's `retry_policy` YAML, as one flow mapping.
    fn to_yaml(&self) -> String {
        let mut y = format!(
            "{{retry_on: \"{}\", num_retries: {}",
            self.retry_on, self.retries
        );
        if !self.retriable_status_codes.is_empty() {
            let codes: Vec<String> = self
                .retriable_status_codes
                .iter()
                .map(u16::to_string)
                .collect();
            let _ = write!(y, ", retriable_status_codes: [{}]", codes.join(", "));
        }
        if self.avoid_previous_hosts {
            y.push_str(
                ", retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}], host_selection_retry_max_attempts: 5",
            );
        }
        y.push('}');
        y
    }
}

/// What to put in the generated Envoy config. Build with [`EnvoyConfig::new`] and the
/// chained setters; every setting has the GIE reference value as its default, except the
/// route retry policy (the reference config has none) and the JSON body of a failed
/// ext_proc exchange (the reference config leaves it empty).
#[derive(Clone, Debug)]
pub struct EnvoyConfig {
    ext_proc: Option<SocketAddr>,
    ext_proc_removed: bool,
    ext_proc_health_check: Option<Duration>,
    ext_proc_tls: ExtProcTls,
    request_body_mode: BodyMode,
    response_body_mode: BodyMode,
    failure_mode_allow: bool,
    message_timeout: Duration,
    forward_lb_metadata: bool,
    response_attributes: Vec<String>,
    pool: Vec<SocketAddr>,
    picked_cluster: PickedCluster,
    retry_policy: Option<RetryPolicy>,
    status_on_error: Option<u16>,
    route_timeout: Duration,
    listener_port: u16,
    concurrency: u32,
    log_level: String,
}

impl Default for EnvoyConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl EnvoyConfig {
    /// Defaults: no ext_proc filter until [`EnvoyConfig::ext_proc`] is called; the picker
    /// reached over TLS without certificate verification; both bodies
    /// FULL_DUPLEX_STREAMED; fail closed; message timeout 1000 s; `envoy.lb` metadata
    /// forwarded; `upstream.address` asked for on the response path; empty pool; picked
    /// requests to an `ORIGINAL_DST` cluster; [`RetryPolicy::default`] on both routes; Envoy's
    /// own status (500) when the ext_proc exchange fails, with a JSON body; route timeout
    /// 60 s; listener on a port Envoy picks; one worker thread; log level info.
    pub fn new() -> Self {
        EnvoyConfig {
            ext_proc: None,
            ext_proc_removed: false,
            ext_proc_health_check: None,
            ext_proc_tls: ExtProcTls::Unverified,
            request_body_mode: BodyMode::FullDuplexStreamed,
            response_body_mode: BodyMode::FullDuplexStreamed,
            failure_mode_allow: false,
            message_timeout: Duration::from_secs(1000),
            forward_lb_metadata: true,
            response_attributes: vec!["upstream.address".to_owned()],
            pool: Vec::new(),
            picked_cluster: PickedCluster::OriginalDst,
            retry_policy: Some(RetryPolicy::default()),
            status_on_error: None,
            route_timeout: Duration::from_secs(60),
            listener_port: 0,
            concurrency: 1,
            log_level: "info".to_owned(),
        }
    }

    /// Adds the ext_proc filter, calling the picker's gRPC server at `addr` over HTTP/2.
    pub fn ext_proc(mut self, addr: SocketAddr) -> Self {
        self.ext_proc = Some(addr);
        self
    }

    /// Talks to the picker in plaintext HTTP/2, for `infergate epp --secure-serving=false` or
    /// any other picker that does not serve TLS. The default is TLS, as `infergate epp` and
    /// the reference picker serve by default.
    pub fn ext_proc_plaintext(mut self) -> Self {
        self.ext_proc_tls = ExtProcTls::Off;
        self
    }

    /// Talks to the picker over TLS and verifies its certificate chain against the PEM CA
    /// certificate(s) in `ca_file` (the default is TLS without verification).
    pub fn ext_proc_trusted_ca(mut self, ca_file: impl Into<PathBuf>) -> Self {
        self.ext_proc_tls = ExtProcTls::TrustedCa(ca_file.into());
        self
    }

    /// Removes the ext_proc filter: a plain proxy onto the pool.
    pub fn without_ext_proc(mut self) -> Self {
        self.ext_proc = None;
        self.ext_proc_removed = false;
        self
    }

    /// Has Envoy probe the picker's port with a TCP health check every `interval` and stop
    /// calling it while it is down (no panic routing). Off by default, as in the GIE
    /// reference config. With it on, a picker that refuses connections is known to be down
    /// before a request arrives, which is what lets FailOpen work with full-duplex bodies.
    pub fn ext_proc_health_check(mut self, interval: Option<Duration>) -> Self {
        self.ext_proc_health_check = interval;
        self
    }

    /// Keeps the ext_proc filter but gives its cluster no endpoints, as when the picker's
    /// Deployment is gone and its Service has no ready pods. Unlike a picker that refuses
    /// connections, Envoy learns this before the body is sent, so FailOpen works here even
    /// with full-duplex bodies.
    pub fn ext_proc_removed(mut self) -> Self {
        self.ext_proc = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        self.ext_proc_removed = true;
        self
    }

    /// How the request body goes to the picker (default FULL_DUPLEX_STREAMED; NONE is
    /// accepted too, for a picker that routes on headers only).
    pub fn request_body_mode(mut self, mode: BodyMode) -> Self {
        self.request_body_mode = mode;
        self
    }

    /// How the response body goes to the picker (default FULL_DUPLEX_STREAMED).
    pub fn response_body_mode(mut self, mode: BodyMode) -> Self {
        self.response_body_mode = mode;
        self
    }

    /// `true`: when the picker cannot be reached, route without it (FailOpen).
    /// `false` (default): refuse the request (FailClose).
    pub fn failure_mode_allow(mut self, allow: bool) -> Self {
        self.failure_mode_allow = allow;
        self
    }

    /// How long Envoy waits for each answer from the picker (default 1000 s, as the GIE).
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.message_timeout = timeout;
        self
    }

    /// Whether Envoy accepts `envoy.lb` dynamic metadata from the picker and sends it back
    /// on later messages, e.g. with the response headers (default yes).
    pub fn forward_lb_metadata(mut self, forward: bool) -> Self {
        self.forward_lb_metadata = forward;
        self
    }

    /// Envoy attributes sent to the picker with the response headers (default
    /// `["upstream.address"]`; empty to send none).
    pub fn response_attributes(mut self, attributes: &[&str]) -> Self {
        self.response_attributes = attributes.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The pool's endpoints: the fallback cluster used when no destination header is set.
    pub fn pool(mut self, endpoints: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.pool = endpoints.into_iter().collect();
        self
    }

    /// Which cluster serves picked requests (default [`PickedCluster::OriginalDst`]).
    pub fn picked_cluster(mut self, cluster: PickedCluster) -> Self {
        self.picked_cluster = cluster;
        self
    }

    /// The retry policy of both routes (default [`RetryPolicy::default`]; `None`: no
    /// retries, as the GIE reference config).
    pub fn retry_policy(mut self, policy: Option<RetryPolicy>) -> Self {
        self.retry_policy = policy;
        self
    }

    /// The status Envoy answers when the ext_proc exchange fails and the filter fails
    /// closed (Envoy's `status_on_error`; default unset, which Envoy answers with 500). The
    /// body is a JSON error saying that the endpoint picker is unavailable either way.
    pub fn status_on_error(mut self, status: u16) -> Self {
        self.status_on_error = Some(status);
        self
    }

    /// Per-request timeout of both routes (default 60 s; zero means none).
    pub fn route_timeout(mut self, timeout: Duration) -> Self {
        self.route_timeout = timeout;
        self
    }

    /// A fixed listener port (default 0: Envoy picks one, read back from its admin API).
    pub fn listener_port(mut self, port: u16) -> Self {
        self.listener_port = port;
        self
    }

    /// Envoy worker threads (default 1).
    pub fn concurrency(mut self, threads: u32) -> Self {
        self.concurrency = threads.max(1);
        self
    }

    /// Envoy's log level: trace, debug, info (default), warning, error, critical, off.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_owned();
        self
    }

    /// The Envoy bootstrap YAML for this config.
    pub fn to_yaml(&self) -> String {
        let mut y = String::new();
        let route_timeout = secs(self.route_timeout);
        // `let _ =` on writes: writing to a String cannot fail.
        let _ = write!(
            y,
            r#"# Generated by infergate-testkit.
node: {{id: infergate-testkit, cluster: infergate-testkit}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: gateway
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    per_connection_buffer_limit_bytes: {limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          codec_type: AUTO
          route_config:
            name: gateway
            virtual_hosts:
            - name: pool
              domains: ["*"]
              routes:
              - match:
                  prefix: "/"
                  headers: [{{name: {dest}, present_match: true}}]
                route: {{cluster: picked_endpoint, timeout: {route_timeout}{retry}}}
              - match: {{prefix: "/"}}
                route: {{cluster: pool_fallback, timeout: {route_timeout}{retry}}}
"#,
            port = self.listener_port,
            limit = BUFFER_LIMIT_BYTES,
            dest = DESTINATION_HEADER,
            retry = match &self.retry_policy {
                Some(policy) if policy.retries > 0 =>
                    format!(", retry_policy: {}", policy.to_yaml()),
                _ => String::new(),
            },
        );
        if self.ext_proc.is_some() {
            // Envoy answers a failed ext_proc exchange with an empty body; give it one that
            // says what happened, in the picker's own error format. The CEL filter matches
            // only Envoy's ext_proc failures (response code details `ext_proc_error_...`),
            // not the picker's immediate responses, whose bodies pass through untouched.
            y.push_str(EXT_PROC_ERROR_REPLY);
        }
        y.push_str("          http_filters:\n");
        if self.ext_proc.is_some() {
            let _ = write!(
                y,
                r#"          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {{cluster_name: ext_proc}}
              failure_mode_allow: {allow}
              message_timeout: {msg_timeout}{status_on_error}
              processing_mode:
                request_header_mode: SEND
                response_header_mode: SEND
                request_body_mode: {req_body}
                response_body_mode: {resp_body}
                request_trailer_mode: {req_trailer}
                response_trailer_mode: {resp_trailer}
"#,
                allow = self.failure_mode_allow,
                msg_timeout = secs(self.message_timeout),
                status_on_error = match self.status_on_error {
                    Some(code) => format!("\n              status_on_error: {{code: {code}}}"),
                    None => String::new(),
                },
                req_body = self.request_body_mode.as_envoy(),
                resp_body = self.response_body_mode.as_envoy(),
                req_trailer = self.request_body_mode.trailer_mode(),
                resp_trailer = self.response_body_mode.trailer_mode(),
            );
            if self.forward_lb_metadata {
                // Envoy drops metadata from the processor unless its namespace is listed in
                // receiving_namespaces; forwarding_namespaces sends it back on later messages.
                y.push_str(
                    "              metadata_options:\n                forwarding_namespaces: {untyped: [\"envoy.lb\"]}\n                receiving_namespaces: {untyped: [\"envoy.lb\"]}\n",
                );
            }
            if !self.response_attributes.is_empty() {
                let attrs: Vec<String> = self
                    .response_attributes
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect();
                let _ = writeln!(
                    y,
                    "              response_attributes: [{}]",
                    attrs.join(", ")
                );
            }
        }
        y.push_str(
            r#"          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
"#,
        );
        if let Some(addr) = self.ext_proc {
            let _ = write!(
                y,
                r#"  - name: ext_proc
    type: STATIC
    connect_timeout: 1s
    per_connection_buffer_limit_bytes: {limit}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
{health}{tls}    load_assignment:
      cluster_name: ext_proc
      endpoints: [{{lb_endpoints: [{endpoint}]}}]
"#,
                limit = BUFFER_LIMIT_BYTES,
                health = match self.ext_proc_health_check {
                    Some(every) => format!(
                        "    common_lb_config: {{healthy_panic_threshold: {{value: 0}}}}\n    health_checks:\n    - {{timeout: 1s, interval: {every}, unhealthy_threshold: 1, healthy_threshold: 1, no_traffic_interval: {every}, tcp_health_check: {{}}}}\n",
                        every = secs(every)
                    ),
                    None => String::new(),
                },
                tls = self.ext_proc_tls_yaml(),
                endpoint = if self.ext_proc_removed {
                    String::new()
                } else {
                    lb_endpoint(addr)
                },
            );
        }
        let endpoints: Vec<String> = self.pool.iter().map(|a| lb_endpoint(*a)).collect();
        match self.picked_cluster {
            PickedCluster::OriginalDst => {
                let _ = write!(
                    y,
                    r#"  - name: picked_endpoint
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    per_connection_buffer_limit_bytes: {limit}
    original_dst_lb_config: {{use_http_header: true, http_header_name: {dest}}}
{breakers}"#,
                    limit = BUFFER_LIMIT_BYTES,
                    dest = DESTINATION_HEADER,
                    breakers = CIRCUIT_BREAKERS,
                );
            }
            PickedCluster::OverrideHost => {
                let _ = write!(
                    y,
                    r#"  - name: picked_endpoint
    type: STATIC
    connect_timeout: 2s
    per_connection_buffer_limit_bytes: {limit}
{breakers}    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources: [{{header: {dest}}}]
            selected_host_key: {{key: envoy.lb, path: [{{key: {dest}-served}}]}}
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config: {{"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin}}
    load_assignment:
      cluster_name: picked_endpoint
      endpoints: [{{lb_endpoints: [{endpoints}]}}]
"#,
                    limit = BUFFER_LIMIT_BYTES,
                    dest = DESTINATION_HEADER,
                    endpoints = endpoints.join(", "),
                    breakers = CIRCUIT_BREAKERS,
                );
            }
        }
        let _ = write!(
            y,
            r#"  - name: pool_fallback
    type: STATIC
    lb_policy: ROUND_ROBIN
    connect_timeout: 2s
    per_connection_buffer_limit_bytes: {limit}
{breakers}    load_assignment:
      cluster_name: pool_fallback
      endpoints: [{{lb_endpoints: [{endpoints}]}}]
"#,
            limit = BUFFER_LIMIT_BYTES,
            endpoints = endpoints.join(", "),
            breakers = CIRCUIT_BREAKERS,
        );
        y
    }

    /// The ext_proc cluster's transport socket: none for plaintext, else an
    /// UpstreamTlsContext offering h2 by ALPN, with or without a trusted CA.
    fn ext_proc_tls_yaml(&self) -> String {
        let validation = match &self.ext_proc_tls {
            ExtProcTls::Off => return String::new(),
            ExtProcTls::Unverified => String::new(),
            // The SNI and the name checked: what `infergate epp`'s self-signed certificate
            // (and the test certificates) carry.
            ExtProcTls::TrustedCa(ca) => format!(
                "\n          validation_context: {{trusted_ca: {{filename: {:?}}}, match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: localhost}}}}]}}",
                ca.display().to_string()
            ),
        };
        format!(
            r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: [h2]{validation}
"#
        )
    }

    /// Checks the config with `envoy --mode validate`, returning Envoy's complaint on failure.
    pub fn validate(&self) -> anyhow::Result<()> {
        let binary = envoy_binary()?;
        let dir = run_dir("validate")?;
        let path = dir.join("envoy.yaml");
        fs::write(&path, self.to_yaml())?;
        let out = Command::new(&binary)
            .arg("--mode")
            .arg("validate")
            .arg("-c")
            .arg(&path)
            .arg("--disable-hot-restart")
            .arg("-l")
            .arg("warning")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if out.status.success() {
            let _ = fs::remove_dir_all(&dir);
            return Ok(());
        }
        bail!(
            "envoy rejected {}:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn lb_endpoint(addr: SocketAddr) -> String {
    format!(
        "{{endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}}}",
        addr.ip(),
        addr.port()
    )
}

/// A running Envoy process; killed when dropped.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    log_path: PathBuf,
    admin: SocketAddr,
    listener: SocketAddr,
}

impl Envoy {
    /// Writes the config, starts Envoy, and returns once its admin API says LIVE and the
    /// listener accepts connections (30 s at most).
    pub async fn start(cfg: EnvoyConfig) -> anyhow::Result<Envoy> {
        let binary = tokio::task::spawn_blocking(envoy_binary)
            .await
            .context("envoy install task")??;
        let dir = run_dir("run")?;
        let config_path = dir.join("envoy.yaml");
        let admin_path = dir.join("admin-address");
        let log_path = dir.join("envoy.log");
        fs::write(&config_path, cfg.to_yaml())?;
        let log = fs::File::create(&log_path)?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--concurrency")
            .arg(cfg.concurrency.to_string())
            // Hot restart is off, so Envoys share no memory; the unique base id is there so
            // that turning it back on would not make concurrent instances collide.
            .arg("--disable-hot-restart")
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("-l")
            .arg(&cfg.log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut envoy = Envoy {
            child,
            dir,
            log_path,
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listener: SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.listener_port)),
        };
        if let Err(e) = envoy.wait_ready(&admin_path, Duration::from_secs(30)).await {
            let tail = envoy.log_tail(40);
            return Err(e.context(format!(
                "envoy did not become ready; log {}:\n{tail}",
                envoy.log_path.display()
            )));
        }
        Ok(envoy)
    }

    async fn wait_ready(&mut self, admin_path: &Path, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let check_deadline = |what: &str| -> anyhow::Result<()> {
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            Ok(())
        };
        // 1. The admin address file appears once the admin listener is bound.
        loop {
            self.check_alive()?;
            if let Ok(text) = fs::read_to_string(admin_path) {
                if let Ok(addr) = text.trim().parse::<SocketAddr>() {
                    self.admin = addr;
                    break;
                }
            }
            check_deadline("the admin address file")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 2. /ready answers LIVE once the listeners and clusters are initialised.
        loop {
            self.check_alive()?;
            if let Ok((status, _, body)) = crate::http::get(&self.admin_url(), "/ready").await {
                if status.is_success() && body.starts_with(b"LIVE") {
                    break;
                }
            }
            check_deadline("/ready to say LIVE")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 3. The listener's real port, when Envoy picked it.
        if self.listener.port() == 0 {
            let (_, _, body) =
                crate::http::get(&self.admin_url(), "/listeners?format=json").await?;
            let v: serde_json::Value =
                serde_json::from_slice(&body).context("parsing admin /listeners")?;
            let port = v["listener_statuses"]
                .as_array()
                .and_then(|ls| ls.iter().find(|l| l["name"] == "gateway"))
                .and_then(|l| l.pointer("/local_address/socket_address/port_value"))
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("no gateway listener port in admin /listeners: {v}"))?;
            self.listener.set_port(port);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        crate::ports::wait_for_port(self.listener, left.max(Duration::from_secs(1))).await
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("envoy exited early with {status}");
        }
        Ok(())
    }

    /// `http://127.0.0.1:<listener port>`: where clients send requests.
    pub fn url(&self) -> String {
        format!("http://{}", self.listener)
    }

    /// The gateway listener's address.
    pub fn listener_addr(&self) -> SocketAddr {
        self.listener
    }

    /// `http://127.0.0.1:<admin port>`: Envoy's admin API (`/stats`, `/clusters`, ...).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Envoy's stats whose names contain `filter`, as `name: value` text lines.
    pub async fn stats(&self, filter: &str) -> anyhow::Result<String> {
        let (_, _, body) =
            crate::http::get(&self.admin_url(), &format!("/stats?filter={filter}")).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The file Envoy logs to (also printed if a test panics while this Envoy runs).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The folder holding this instance's config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log_path, lines)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- envoy log {} (last 60 lines) ---\n{}\n--- end of envoy log ---",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
    }
}

fn tail_file(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    // Logs can be large at debug level; the last 256 KiB hold far more than enough lines.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

fn unique_base_id() -> u32 {
    // pid (at most 2^22 on Linux) times 1000 plus a per-process counter fits in a u32.
    let n = INSTANCE.fetch_add(1, Ordering::Relaxed) % 1000;
    (std::process::id() % 4_000_000) * 1000 + n
}

/// A fresh folder for one Envoy's files, under `<target>/testkit/envoy/`. Kept after the
/// run so that a failed test's log can still be read; pruned after a day.
fn run_dir(kind: &str) -> anyhow::Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
    let root = crate::target_dir().join("testkit").join("envoy");
    static PRUNED: std::sync::Once = std::sync::Once::new();
    PRUNED.call_once(|| prune_older_than(&root, Duration::from_secs(24 * 3600)));
    let dir = root.join(format!("{kind}-{stamp}-{}-{n}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes run folders left by earlier test runs, so that logs do not pile up forever.
fn prune_older_than(root: &Path, age: Duration) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|elapsed| elapsed > age);
        if old {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Where the install script puts its venv: `$INFERGATE_VENV`, else `<target>/venv`.
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("INFERGATE_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => crate::repo_root().join("target").join("venv"),
    }
}

fn binary_in_venv(venv: &Path) -> Option<PathBuf> {
    let mut candidates = vec![venv.join("site/envoy/_bin/envoy")];
    if let Ok(entries) = fs::read_dir(venv.join("lib")) {
        for e in entries.flatten() {
            candidates.push(e.path().join("site-packages/envoy/_bin/envoy"));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The Envoy binary to run: `$INFERGATE_ENVOY` if set, else the one in the venv, else the
/// result of running `scripts/install-envoy.sh` (once, even when several test processes
/// ask at the same time).
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("INFERGATE_ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("INFERGATE_ENVOY={} is not a file", path.display());
        }
        return Ok(path);
    }
    static INSTALLED: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = installed.as_ref() {
        return Ok(path.clone());
    }
    let venv = venv_dir();
    let path = match binary_in_venv(&venv) {
        Some(path) => path,
        None => install_locked(&venv)?,
    };
    *installed = Some(path.clone());
    Ok(path)
}

/// Removes the lock folder when the installer is done, however it ends.
struct InstallLock(PathBuf);

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

fn install_locked(venv: &Path) -> anyhow::Result<PathBuf> {
    // mkdir is atomic: the process that creates the folder installs, the others wait.
    let mut lock_name = venv.as_os_str().to_owned();
    lock_name.push(".install-lock");
    let lock = PathBuf::from(lock_name);
    if let Some(parent) = lock.parent() {
        fs::create_dir_all(parent)?;
    }
    let stale_after = Duration::from_secs(15 * 60);
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    loop {
        match fs::create_dir(&lock) {
            Ok(()) => {
                let _guard = InstallLock(lock.clone());
                if let Some(path) = binary_in_venv(venv) {
                    return Ok(path);
                }
                return run_install_script(venv);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if let Some(path) = binary_in_venv(venv) {
                    return Ok(path);
                }
                let age = fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if age > stale_after {
                    // An installer that died long ago; take over.
                    let _ = fs::remove_dir(&lock);
                    continue;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "waited too long for another process installing Envoy (lock {})",
                        lock.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", lock.display())),
        }
    }
}

fn run_install_script(venv: &Path) -> anyhow::Result<PathBuf> {
    let script = crate::repo_root().join("scripts").join("install-envoy.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("INFERGATE_VENV", venv)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let printed = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(printed.lines().last().unwrap_or("").trim());
    if !path.is_file() {
        bail!(
            "{} printed {:?}, which is not a file; stderr:\n{}",
            script.display(),
            printed,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_body_names_the_documented_type() {
        assert!(EXT_PROC_ERROR_REPLY.contains(&format!("type: {PICKER_UNAVAILABLE_TYPE}\n")));
    }

    #[test]
    fn retries_and_the_override_host_cluster_are_where_asked() {
        let pool = [SocketAddr::from((Ipv4Addr::LOCALHOST, 18001))];
        let picker = SocketAddr::from((Ipv4Addr::LOCALHOST, 18002));
        let default = EnvoyConfig::new().ext_proc(picker).pool(pool).to_yaml();
        assert_eq!(default.matches("retry_policy:").count(), 2, "{default}");
        assert!(default.contains("type: ORIGINAL_DST"), "{default}");
        assert!(default.contains("local_reply_config"), "{default}");
        assert!(!default.contains("status_on_error"), "{default}");
        let off = EnvoyConfig::new()
            .ext_proc(picker)
            .pool(pool)
            .retry_policy(None)
            .to_yaml();
        assert!(!off.contains("retry_policy:"), "{off}");
        let over = EnvoyConfig::new()
            .ext_proc(picker)
            .pool(pool)
            .picked_cluster(PickedCluster::OverrideHost)
            .status_on_error(503)
            .to_yaml();
        assert!(!over.contains("ORIGINAL_DST"), "{over}");
        assert!(
            over.contains("envoy.load_balancing_policies.override_host"),
            "{over}"
        );
        assert!(over.contains("status_on_error: {code: 503}"), "{over}");
        assert_eq!(over.matches("max_retries: 1024").count(), 2, "{over}");
    }
}
