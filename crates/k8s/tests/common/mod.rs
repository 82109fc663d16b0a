//! What the Kubernetes tests share.

/// A kube-rs client for the scripted API server (`infergate_testkit::kube_api`) at `addr`.
pub fn mk_client(addr: std::net::SocketAddr) -> kube::Client {
    kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
}
