//! Every input the fuzzers keep (`fuzz/corpus/<target>/`) and every crash found and fixed
//! (`fuzz/regressions/<target>/`), run through the same functions the fuzz targets call,
//! as an ordinary test: CI checks them on stable without cargo-fuzz.

use std::path::{Path, PathBuf};

use infergate_fuzz_harness::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() {
    for (name, run) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            corpus.len() >= 3,
            "fuzz/corpus/{name} has {} inputs; seed it with `cargo run -p infergate-fuzz-harness --example write_seeds`",
            corpus.len()
        );
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for path in corpus.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} breaks a promise; reproduce with `cargo +nightly fuzz run {name} {}`",
                path.display(),
                path.display()
            );
        }
        println!(
            "{name}: {} corpus inputs, {} regressions",
            corpus.len(),
            regressions.len()
        );
    }
}

#[test]
fn the_fuzz_targets_are_the_harness_targets() {
    // Each target named here has its cargo-fuzz wrapper, and no wrapper is left unreplayed.
    let mut wrappers: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    wrappers.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(wrappers, names);
}

/// The ext_proc seeds are the flows they are named after, so the fuzzer starts from
/// inputs that reach scheduling, rewriting and the error paths.
#[test]
fn the_extproc_seeds_drive_real_decisions_and_errors() {
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
    let seed = |name: &str| {
        let path = fuzz_dir()
            .join("corpus/extproc")
            .join(format!("seed-{name}"));
        infergate_fuzz_harness::extproc_replies(&std::fs::read(path).unwrap())
    };
    let destination =
        |replies: &[envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse]| {
            replies.iter().find_map(|r| {
                let common = match r.response.as_ref()? {
                    Response::RequestHeaders(h) => h.response.as_ref()?,
                    Response::RequestBody(b) => b.response.as_ref()?,
                    _ => return None,
                };
                common
                    .header_mutation
                    .as_ref()?
                    .set_headers
                    .iter()
                    .find_map(|h| {
                        let h = h.header.as_ref()?;
                        (h.key == "x-gateway-destination-endpoint")
                            .then(|| String::from_utf8_lossy(&h.raw_value).into_owned())
                    })
            })
        };
    let status =
        |replies: &[envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse]| {
            replies.iter().find_map(|r| match r.response.as_ref()? {
                Response::ImmediateResponse(i) => i.status.as_ref().map(|s| s.code),
                _ => None,
            })
        };
    let picked = destination(&seed("full-duplex-completion")).expect("a destination");
    assert!(
        infergate_fuzz_harness::POOL.contains(&picked.split(',').next().unwrap()),
        "{picked}"
    );
    let hinted = destination(&seed("subset-hint")).expect("a destination");
    assert!(
        hinted.starts_with("10.0.0.2:8000") || hinted.starts_with("10.0.0.3:8000"),
        "{hinted}"
    );
    assert_eq!(status(&seed("subset-matches-nothing")), Some(503));
    assert_eq!(status(&seed("unknown-objective")), Some(400));
    assert_eq!(status(&seed("malformed-body")), Some(400));
}
