//! `infergate config check` and the picker refuse a config they would not honour, instead
//! of running it differently from what it says.

use std::process::Command;

fn check(config: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("infergate-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("config-{n}.yaml"));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_infergate"))
        .args(["config", "check", "--config-file"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

const HEAD: &str =
    "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n";

fn with_source(params: &str) -> String {
    format!(
        "{HEAD}plugins:\n- type: metrics-data-source\n  parameters:\n{params}- type: queue-scorer\n- type: max-score-picker\n\
         schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n  - pluginRef: max-score-picker\n"
    )
}

#[test]
fn https_metrics_source_and_a_custom_path_are_accepted() {
    let (ok, text) = check(&with_source("    scheme: https\n"));
    assert!(ok, "{text}");
    assert!(text.contains(": ok:"), "{text}");
    let (ok, text) = check(&with_source("    path: /custom/metrics\n"));
    assert!(ok, "{text}");
    assert!(text.contains(": ok:"), "{text}");
}
