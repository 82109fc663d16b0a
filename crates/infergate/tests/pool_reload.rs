//! The pool file is re-read on edit: good edits take effect without a restart, bad ones are
//! refused with file, line and field while the last good pool keeps serving.

mod common;

use std::time::Duration;

use common::*;
use infergate_testkit::post_json;

fn pool(members: &[usize]) -> String {
    let mut s = String::from(
        "apiVersion: infergate.dev/v1alpha1\nkind: StaticEndpoints\nmetadata: {name: pool}\nspec:\n  endpoints:\n",
    );
    for i in members {
        s.push_str(&format!("  - {{address: \"{{B{i}}}\", port: {{P{i}}}}}\n"));
    }
    s
}

async fn served_by(rig: &Rig, n: usize) -> Vec<usize> {
    let mut seen = vec![0; rig.backends.len()];
    for i in 0..n {
        let (status, h, body) = post_json(
            &rig.envoy.url(),
            "/v1/completions",
            &[],
            completion("m", &format!("reload {i} {}", "q".repeat(i))),
        )
        .await
        .unwrap();
        assert_eq!(status.as_u16(), 200, "{}", String::from_utf8_lossy(&body));
        seen[rig.index_of(h["x-served-by"].to_str().unwrap()).unwrap()] += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_file_edits_apply_live_and_bad_edits_keep_the_last_good_pool() {
    let rig = Rig::start(RigOptions {
        pool_yaml: Some(pool(&[0])),
        ..Default::default()
    })
    .await;
    assert_eq!(served_by(&rig, 10).await, vec![10, 0, 0]);

    rig.write_pool(&pool(&[1, 2]));
    let moved = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&rig.epp.log)
            .unwrap_or_default()
            .contains("pool file reloaded")
    })
    .await;
    assert!(moved, "reload not logged:\n{}", rig.epp.log_text());
    let seen = served_by(&rig, 20).await;
    assert_eq!(seen[0], 0, "removed endpoint still used: {seen:?}");
    assert!(seen[1] > 0 && seen[2] > 0, "{seen:?}");

    // Line 7 has a field that does not exist.
    let bad = pool(&[0]) + "  - {address: \"{B1}\", port: {P1}, weight: 3}\n";
    assert_eq!(bad.lines().position(|l| l.contains("weight")), Some(6));
    rig.write_pool(&bad);
    let refused = eventually(Duration::from_secs(5), || {
        rig.epp.log_text().contains("edit refused")
    })
    .await;
    let log = rig.epp.log_text();
    assert!(refused, "bad edit not refused:\n{log}");
    let line = log.lines().find(|l| l.contains("edit refused")).unwrap();
    assert!(line.contains("pool.yaml:7"), "no file:line in {line}");
    assert!(line.contains("weight"), "no field in {line}");
    let seen = served_by(&rig, 10).await;
    assert_eq!(seen[0], 0, "a refused edit must not take effect: {seen:?}");
}
