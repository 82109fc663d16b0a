//! Shared rig for end-to-end tests: the real `infergate epp` binary, real Envoy 1.40 in front
//! of it, and fake vLLM-like model servers on 127.0.0.1 whose metrics each test controls.

#![allow(dead_code)]

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use infergate_testkit::kube_api::{self, FakeKubeApi};
use infergate_testkit::{free_port, wait_for_port, BodyMode, Envoy, EnvoyConfig, FakeModelServer};

/// A running `infergate epp`, killed (by its PID) when dropped.
pub struct Epp {
    child: Child,
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    pub dir: PathBuf,
}

impl Epp {
    /// Start the binary with `args` plus fresh ports on 127.0.0.1; waits until it listens.
    pub async fn start(args: &[String]) -> Epp {
        Self::start_with_env(args, &[]).await
    }

    /// As [`Epp::start`], with extra environment variables.
    pub async fn start_with_env(args: &[String], env: &[(&str, &str)]) -> Epp {
        let dir = std::env::temp_dir().join(format!(
            "infergate-e2e-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (grpc, health, metrics) = (free_port(), free_port(), free_port());
        let log = dir.join("epp.log");
        let child = Command::new(env!("CARGO_BIN_EXE_infergate"))
            .arg("epp")
            .args(["--listen-address", "127.0.0.1"])
            .args(["--grpc-port", &grpc.to_string()])
            .args(["--grpc-health-port", &health.to_string()])
            .args(["--metrics-port", &metrics.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .env("INFERGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn infergate");
        let epp = Epp {
            child,
            grpc: ([127, 0, 0, 1], grpc).into(),
            health: ([127, 0, 0, 1], health).into(),
            metrics: ([127, 0, 0, 1], metrics).into(),
            log,
            dir,
        };
        if wait_for_port(epp.grpc, Duration::from_secs(20))
            .await
            .is_err()
        {
            panic!("infergate epp did not start; log:\n{}", epp.log_text());
        }
        // Let the first scrapes land (50 ms interval).
        tokio::time::sleep(Duration::from_millis(400)).await;
        epp
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics_text(&self) -> String {
        let (_, _, body) = infergate_testkit::get(&format!("http://{}", self.metrics), "/metrics")
            .await
            .unwrap();
        String::from_utf8_lossy(&body).into_owned()
    }

    /// `GET /metrics` with an optional bearer token: the status and the body.
    pub async fn metrics_with_token(&self, token: Option<&str>) -> (u16, String) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let resp = infergate_testkit::HttpClient::new()
            .send(
                hyper::Method::GET,
                &format!("http://{}", self.metrics),
                "/metrics",
                &headers,
                bytes::Bytes::new(),
            )
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The picker's gRPC `readiness` health status; `None` while it cannot be asked.
    pub async fn readiness(
        &self,
    ) -> Option<tonic_health::pb::health_check_response::ServingStatus> {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.health))
            .ok()?
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "readiness".into(),
            })
            .await
            .ok()?;
        tonic_health::pb::health_check_response::ServingStatus::try_from(r.into_inner().status).ok()
    }

    /// Whether `readiness` is SERVING.
    pub async fn is_ready(&self) -> bool {
        self.readiness().await
            == Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    }

    /// SIGTERM, then wait (at most 10 s) for the process to exit; returns whether it did.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Stop the picker now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Epp {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "infergate epp log ({}):\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Backends, picker and Envoy for one test.
pub struct Rig {
    pub backends: Vec<FakeModelServer>,
    /// The pool file the picker watches, when the rig was started with one.
    pub pool_path: Option<PathBuf>,
    /// The scripted API server, when the rig runs the picker in Kubernetes mode.
    pub kube_api: Option<(FakeKubeApi, tokio::task::JoinHandle<()>)>,
    pub epp: Epp,
    pub envoy: Envoy,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some((_, server)) = &self.kube_api {
            server.abort();
        }
    }
}

pub struct RigOptions {
    pub backends: usize,
    pub config_yaml: Option<String>,
    /// Pool file text; `{B0}`, `{B1}`... are replaced by backend addresses.
    pub pool_yaml: Option<String>,
    pub request_body_mode: BodyMode,
    pub failure_mode_allow: bool,
    /// Let Envoy health-check the picker, so a dead picker is known before a request
    /// commits its body to the ext_proc stream (needed for FailOpen with full duplex).
    pub envoy_health_check: bool,
    pub extra_args: Vec<String>,
    /// Run the picker in Kubernetes mode: the same pool served by a scripted API server
    /// (an InferencePool selecting the backends as Pods on 127.0.0.2, .3, ... sharing one
    /// port, plus the pool file's InferenceObjectives and InferenceModelRewrites) instead
    /// of a file or flags.
    pub kubernetes: bool,
    /// The picker serves ext_proc over TLS (its default) and Envoy connects with TLS;
    /// `false` runs it with `--secure-serving=false` behind a plaintext Envoy cluster.
    pub secure_serving: bool,
    /// Envoy verifies the picker's certificate against this PEM CA file (by default it
    /// does not verify, as gateways do not).
    pub envoy_trusted_ca: Option<PathBuf>,
    /// Envoy's ext_proc `message_timeout` (the testkit's default is 1000 s; Envoy's own is
    /// 200 ms).
    pub message_timeout: Option<Duration>,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            backends: 3,
            config_yaml: None,
            pool_yaml: None,
            request_body_mode: BodyMode::FullDuplexStreamed,
            failure_mode_allow: false,
            envoy_health_check: false,
            extra_args: vec![],
            kubernetes: false,
            secure_serving: true,
            envoy_trusted_ca: None,
            message_timeout: None,
        }
    }
}

impl Rig {
    pub async fn start(opts: RigOptions) -> Rig {
        let mut backends = Vec::new();
        let shared_port = free_port();
        for i in 0..opts.backends {
            let b = if opts.kubernetes {
                let ip = std::net::Ipv4Addr::new(127, 0, 0, 2 + i as u8);
                FakeModelServer::start_on(&format!("b{i}"), (ip, shared_port).into()).await
            } else {
                FakeModelServer::start(&format!("b{i}")).await
            };
            backends.push(b.unwrap());
        }
        let tmp = std::env::temp_dir().join(format!(
            "infergate-rig-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut args = opts.extra_args.clone();
        if !opts.secure_serving {
            args.push("--secure-serving=false".into());
        }
        let mut pool_path = None;
        if let Some(cfg) = &opts.config_yaml {
            let p = tmp.join("epp-config.yaml");
            std::fs::write(&p, cfg).unwrap();
            args.extend(["--config-file".into(), p.display().to_string()]);
        }
        let mut env: Vec<(&str, String)> = Vec::new();
        let mut kube_api = None;
        match &opts.pool_yaml {
            _ if opts.kubernetes => {
                let api = kube_objects(opts.pool_yaml.as_deref(), &backends, shared_port);
                let (addr, server) = kube_api::serve(api.clone()).await;
                let cfg = tmp.join("kubeconfig");
                std::fs::write(&cfg, kube_api::kubeconfig(addr, kube_api::NS)).unwrap();
                env.push(("KUBECONFIG", cfg.display().to_string()));
                args.extend(
                    ["--pool-namespace", kube_api::NS, "--pool-name", "pool"].map(String::from),
                );
                args.push("--ha-enable-leader-election=false".into());
                kube_api = Some((api, server));
            }
            Some(pool) => {
                let p = tmp.join("pool.yaml");
                std::fs::write(&p, fill_addrs(pool, &backends)).unwrap();
                args.extend(["--pool-file".into(), p.display().to_string()]);
                args.extend(["--pool-file-poll-interval".into(), "100ms".into()]);
                pool_path = Some(p);
            }
            None => {
                let list: Vec<String> = backends.iter().map(|b| b.addr().to_string()).collect();
                args.extend(["--endpoints".into(), list.join(",")]);
            }
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let epp = Epp::start_with_env(&args, &env).await;
        if opts.kubernetes {
            let t0 = std::time::Instant::now();
            while !epp.is_ready().await {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "the picker never synced from the API server; log:\n{}",
                    epp.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut envoy_cfg = EnvoyConfig::new().ext_proc(epp.grpc);
        if !opts.secure_serving {
            envoy_cfg = envoy_cfg.ext_proc_plaintext();
        }
        if let Some(ca) = &opts.envoy_trusted_ca {
            envoy_cfg = envoy_cfg.ext_proc_trusted_ca(ca);
        }
        if let Some(t) = opts.message_timeout {
            envoy_cfg = envoy_cfg.message_timeout(t);
        }
        let envoy = Envoy::start(
            envoy_cfg
                .request_body_mode(opts.request_body_mode)
                .failure_mode_allow(opts.failure_mode_allow)
                .ext_proc_health_check(
                    opts.envoy_health_check
                        .then_some(Duration::from_millis(200)),
                )
                .pool(backends.iter().map(|b| b.addr())),
        )
        .await
        .expect("start envoy");
        Rig {
            backends,
            pool_path,
            kube_api,
            epp,
            envoy,
        }
    }

    /// Which backend answered (`x-served-by`) -> index.
    pub fn index_of(&self, served_by: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.name() == served_by)
    }

    /// Rewrite the watched pool file (`{B0}`/`{P0}` placeholders filled in).
    pub fn write_pool(&self, text: &str) {
        let path = self
            .pool_path
            .as_ref()
            .expect("rig started without a pool file");
        std::fs::write(path, fill_addrs(text, &self.backends)).unwrap();
    }

    pub fn counts(&self) -> Vec<usize> {
        self.backends.iter().map(|b| b.requests().len()).collect()
    }
}

/// The scripted API server's objects for a Kubernetes-mode rig: the InferencePool `pool`
/// on `port`, each backend as a Ready Pod, and the InferenceObjective and
/// InferenceModelRewrite documents of `pool_yaml` (its StaticEndpoints are the Pods).
fn kube_objects(pool_yaml: Option<&str>, backends: &[FakeModelServer], port: u16) -> FakeKubeApi {
    use serde::Deserialize as _;
    let api = FakeKubeApi::default();
    api.set_list(kube_api::POOLS, vec![kube_api::pool(port)]);
    api.set_list(
        kube_api::PODS,
        backends
            .iter()
            .map(|b| kube_api::pod(b.name(), &b.addr().ip().to_string(), true, 10))
            .collect(),
    );
    let (mut objectives, mut rewrites) = (Vec::new(), Vec::new());
    for doc in serde_yaml_ng::Deserializer::from_str(pool_yaml.unwrap_or("")) {
        let mut v = serde_json::Value::deserialize(doc).expect("pool YAML");
        if v.is_null() {
            continue;
        }
        v["metadata"]["namespace"] = kube_api::NS.into();
        v["metadata"]["resourceVersion"] = "7".into();
        match v["kind"].as_str() {
            Some("InferenceObjective") => objectives.push(v),
            Some("InferenceModelRewrite") => rewrites.push(v),
            _ => {}
        }
    }
    api.set_list(kube_api::OBJECTIVES, objectives);
    api.set_list(kube_api::REWRITES, rewrites);
    api
}

/// Replace `{B0}`, `{B1}`... by ip and `{P0}`... by port of each backend.
pub fn fill_addrs(text: &str, backends: &[FakeModelServer]) -> String {
    let mut t = text.to_string();
    for (i, b) in backends.iter().enumerate() {
        t = t.replace(&format!("{{B{i}}}"), &b.addr().ip().to_string());
        t = t.replace(&format!("{{P{i}}}"), &b.addr().port().to_string());
    }
    t
}

pub fn completion(model: &str, prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 4}))
        .unwrap()
}

/// Poll until `f` holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Sum of a Prometheus counter/histogram sample line(s) starting with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The lines a child prints on `stdout`, read on a thread of their own.
fn lines_of(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `infergate sim`, killed (by its PID) when dropped.
pub struct Sim {
    pub child: Child,
    pub replicas: Vec<SocketAddr>,
}

impl Sim {
    /// Starts the binary and waits for its `replica i listening on http://ADDR` lines.
    pub fn start(args: &[&str], replicas: usize) -> Sim {
        let mut child = Command::new(env!("CARGO_BIN_EXE_infergate"))
            .arg("sim")
            .args(args)
            .env("INFERGATE_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn infergate sim");
        let stdout = child.stdout.take().unwrap();
        let rx = lines_of(stdout);
        let mut sim = Sim {
            child,
            replicas: Vec::new(),
        };
        while sim.replicas.len() < replicas {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("infergate sim did not announce its replicas");
            let addr = line
                .split("http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("unexpected line {line:?}"));
            assert!(
                line.starts_with(&format!("replica {} listening on", sim.replicas.len())),
                "{line}"
            );
            sim.replicas.push(addr);
        }
        sim
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.replicas[i])
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `infergate sim` process per entry of `extra` (one replica each, so that each can
/// be killed or faulted alone), serving `model` in real time on the 8B H100 profile with
/// endless answers bounded by `max_tokens`; `extra[i]` adds flags to process `i`.
pub fn start_sims(model: &str, extra: &[&[&str]]) -> Vec<Sim> {
    extra
        .iter()
        .enumerate()
        .map(|(i, more)| {
            let port = free_port().to_string();
            let seed = i.to_string();
            let mut args = vec![
                "--replicas",
                "1",
                "--port",
                &port,
                "--profile",
                "llama3-8b-h100",
                "--time-scale",
                "1",
                "--served-model-name",
                model,
                "--eos",
                "never",
                "--seed",
                &seed,
            ];
            args.extend_from_slice(more);
            Sim::start(&args, 1)
        })
        .collect()
}

/// A running `infergate serve`, killed (by its PID) when dropped.
pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    /// `http`, or `https` when started with a certificate.
    pub scheme: String,
    /// Everything it printed to stdout before announcing its address.
    pub banner: Vec<String>,
    pub log: PathBuf,
}

impl Serve {
    /// Starts `infergate serve --port 0 ARGS` and waits for its `listening on` line.
    pub fn start(args: &[&str]) -> Serve {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Serve {
        let log = std::env::temp_dir().join(format!(
            "infergate-serve-{}-{}.log",
            std::process::id(),
            free_port()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_infergate"));
        cmd.arg("serve")
            .args(["--port", "0"])
            .args(args)
            .env("INFERGATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn infergate serve");
        let stdout = child.stdout.take().unwrap();
        let rx = lines_of(stdout);
        let mut banner = Vec::new();
        loop {
            let line = match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "infergate serve did not announce its address; its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                }
            };
            banner.push(line.clone());
            if let Some(url) = line.strip_prefix("infergate serve: listening on ") {
                let (scheme, rest) = url.split_once("://").expect("a URL");
                let addr = rest.trim().parse().expect("address");
                let scheme = scheme.to_owned();
                // Keep draining stdout so the child never blocks on a full pipe.
                std::thread::spawn(move || {
                    while let Ok(l) = rx.recv() {
                        let _ = l;
                    }
                });
                // The banner's remaining lines (simulated replicas, curl) follow at once.
                return Serve {
                    child,
                    addr,
                    scheme,
                    banner,
                    log,
                };
            }
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A TLS connection to `addr` as `localhost` with the client `config`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a DNS name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}
