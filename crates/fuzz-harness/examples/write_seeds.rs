//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/seed-*` from
//! real inputs: request bodies of each API, vLLM-style SSE streams, the engines' metrics
//! pages of the scrape tests, the repository's pool files and picker configs, and
//! ext_proc message flows Envoy sends. Run it again after changing a format:
//!
//! `cargo run -p infergate-fuzz-harness --example write_seeds`

use std::path::{Path, PathBuf};

use infergate_fuzz_harness::encode::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn copy(target: &str, name: &str, from: &str) {
    let bytes = std::fs::read(root().join(from)).unwrap_or_else(|e| panic!("{from}: {e}"));
    write(target, name, &bytes);
}

fn main() {
    // openai_body: first byte picks the API (0 completions, 1 chat, 2 responses,
    // 3 conversations, 4 embeddings).
    let bodies: [(&str, u8, &str); 8] = [
        (
            "completions",
            0,
            r#"{"model":"llama","prompt":"Once upon a time","max_tokens":16}"#,
        ),
        (
            "completions-list",
            0,
            r#"{"model":"llama","prompt":["a","b"],"stream":true,"stream_options":{"include_usage":true}}"#,
        ),
        (
            "chat",
            1,
            r#"{"model":"chat","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"stream":true}"#,
        ),
        (
            "chat-escaped-model",
            1,
            r#"{"messages":[],"model":"m\u00f6del\"x\\y"}"#,
        ),
        (
            "responses",
            2,
            r#"{"model":"gpt","instructions":"x","tools":[{"type":"function"}],"input":"hello"}"#,
        ),
        (
            "conversations",
            3,
            r#"{"model":"c","items":[{"type":"message"}]}"#,
        ),
        ("embeddings", 4, r#"{"model":"e5","input":["one","two"]}"#),
        (
            "nested-whitespace",
            1,
            " \n{ \"model\" : \"m\" , \"messages\" : [ ] , \"extra\" : {\"model\":\"inner\"} }",
        ),
    ];
    for (name, api, body) in bodies {
        let mut b = vec![api];
        b.extend_from_slice(body.as_bytes());
        write("openai_body", name, &b);
    }

    // sse_usage: first byte is the chunk size minus one.
    let stream = concat!(
        "data: {\"id\":\"1\",\"choices\":[{\"text\":\"a\"}]}\n\n",
        "data: {\"id\":\"1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,",
        "\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n",
        "data: [DONE]\n\n"
    );
    for (name, size) in [
        ("one-byte-chunks", 0u8),
        ("seven-byte-chunks", 6),
        ("whole", 255),
    ] {
        let mut b = vec![size];
        b.extend_from_slice(stream.as_bytes());
        write("sse_usage", name, &b);
    }
    let crlf = "data: {\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}\r\n\r\ndata: {\"usage\":null}\r\n";
    write(
        "sse_usage",
        "crlf-responses-api",
        &[&[3u8][..], crlf.as_bytes()].concat(),
    );
    write(
        "sse_usage",
        "no-trailing-newline",
        &[&[9u8][..], b"data: {\"usage\":{\"prompt_tokens\":1}}"].concat(),
    );

    for engine in [
        "vllm",
        "vllm_legacy",
        "sglang",
        "trtllm_serve",
        "triton",
        "llamacpp",
    ] {
        copy(
            "prometheus_text",
            engine,
            &format!("crates/scrape/tests/fixtures/{engine}.txt"),
        );
    }

    copy("pool_file", "api-example", "crates/api/examples/pool.yaml");
    copy(
        "pool_file",
        "k8s-examples",
        "crates/k8s/tests/data/examples.yaml",
    );
    copy(
        "pool_file",
        "sim-objectives",
        "deploy/examples/sim/objectives.yaml",
    );
    copy(
        "pool_file",
        "sim-rewrite",
        "deploy/examples/sim/rewrite.yaml",
    );

    copy(
        "picker_config",
        "api-example",
        "crates/api/examples/epp-config.yaml",
    );
    copy("picker_config", "deploy-base", "deploy/base/config.yaml");
    write(
        "picker_config",
        "infergate-profile",
        infergate_api::config::INFERGATE_PROFILE_YAML.as_bytes(),
    );

    // extproc: header key indexes follow HEADER_KEYS in the harness (3 content-type,
    // 6 objective, 11 :status); path indexes follow PATHS (0 completions, 1 chat).
    let json = b"application/json".as_slice();
    let completion = br#"{"model":"chat","prompt":"hello there","max_tokens":4}"#.as_slice();
    let answer = br#"{"id":"x","model":"chat-v1","choices":[{"text":"hi"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
    let flow = |subset: u8, objective: &[u8], body: &[u8], split: bool| {
        let mut f = request_headers(subset, 0, &[(3, json), (6, objective)], false);
        if split {
            let (a, b) = body.split_at(body.len() / 2);
            f.extend(request_body(a, false));
            f.extend(request_body(b, true));
        } else {
            f.extend(request_body(body, true));
        }
        f.extend(response_headers(&[(11, b"200"), (3, json)], false));
        f.extend(response_body(answer, true));
        f
    };
    write(
        "extproc",
        "full-duplex-completion",
        &flow(9, b"interactive", completion, false),
    );
    write("extproc", "split-body", &flow(9, b"", completion, true));
    write("extproc", "subset-hint", &flow(2, b"", completion, false));
    write(
        "extproc",
        "subset-matches-nothing",
        &flow(3, b"", completion, false),
    );
    write(
        "extproc",
        "unknown-objective",
        &flow(9, b"nope", completion, false),
    );
    write(
        "extproc",
        "malformed-body",
        &flow(9, b"", b"{\"model\": ", false),
    );
    let mut buffered = protocol_config(2, 2);
    buffered.extend(flow(9, b"batch", completion, false));
    write("extproc", "buffered-modes", &buffered);
    let mut sse = request_headers(9, 1, &[(3, json)], false);
    sse.extend(request_body(
        br#"{"model":"chat","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        true,
    ));
    sse.extend(response_headers(
        &[(11, b"200"), (3, b"text/event-stream")],
        false,
    ));
    sse.extend(response_body(
        b"data: {\"model\":\"chat-v1\",\"choices\":[]}\n\ndata: [DO",
        false,
    ));
    sse.extend(response_body(b"NE]\n\n", true));
    write("extproc", "streamed-chat", &sse);
    let mut big = request_headers(9, 0, &[(3, json)], false);
    big.extend(request_body(&[b'{'; 16_000], true));
    write("extproc", "large-body", &big);
    let mut headers_only = request_headers(9, 0, &[], true);
    headers_only.extend(response_headers(&[(11, b"503")], true));
    write("extproc", "headers-only", &headers_only);
    println!(
        "seeds written under {}",
        root().join("fuzz/corpus").display()
    );
}
