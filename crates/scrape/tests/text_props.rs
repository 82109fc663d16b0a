//! Property tests for the text parser: it never panics on any input, round-trips what it
//! is given in the canonical form, and every real fixture page parses.

use infergate_scrape::text::{parse, ParseError, Sample};
use proptest::prelude::*;

const FIXTURES: [&str; 6] = [
    include_str!("fixtures/vllm.txt"),
    include_str!("fixtures/vllm_legacy.txt"),
    include_str!("fixtures/sglang.txt"),
    include_str!("fixtures/trtllm_serve.txt"),
    include_str!("fixtures/triton.txt"),
    include_str!("fixtures/llamacpp.txt"),
];

#[test]
fn every_fixture_parses_and_samples_are_well_formed() {
    for page in FIXTURES {
        let samples = parse(page).unwrap();
        assert!(samples.len() >= 10);
        for s in &samples {
            assert_valid(s);
        }
    }
}

#[test]
fn fixtures_parse_the_same_with_crlf_line_ends() {
    for page in FIXTURES {
        let crlf = page.replace('\n', "\r\n");
        assert_eq!(parse(page).unwrap(), parse(&crlf).unwrap());
    }
}

fn assert_valid(s: &Sample<'_>) {
    let mut chars = s.name.chars();
    let first = chars.next().expect("name is not empty");
    assert!(first.is_ascii_alphabetic() || first == '_' || first == ':');
    assert!(chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'));
    for (i, l) in s.labels.iter().enumerate() {
        assert!(!l.name.is_empty());
        assert!(l
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_'));
        assert!(s.labels[..i].iter().all(|o| o.name != l.name));
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, String),
    Delete(usize, usize),
    Replace(usize, char),
}

fn edit() -> impl Strategy<Value = Edit> {
    let junk = prop_oneof![
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(",".to_string()),
        Just("=".to_string()),
        Just("\n".to_string()),
        Just("\r".to_string()),
        Just(" ".to_string()),
        Just("#".to_string()),
        Just("# TYPE ".to_string()),
        Just("NaN".to_string()),
        Just("é".to_string()),
        "\\PC{0,8}",
    ];
    prop_oneof![
        (any::<usize>(), junk).prop_map(|(at, s)| Edit::Insert(at, s)),
        (any::<usize>(), 0usize..64).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), any::<char>()).prop_map(|(at, c)| Edit::Replace(at, c)),
    ]
}

/// The char boundary nearest below `at % (len + 1)`.
fn boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(page: &str, edits: &[Edit]) -> String {
    let mut s = page.to_string();
    for e in edits {
        match e {
            Edit::Insert(at, text) => {
                let i = boundary(&s, *at);
                s.insert_str(i, text);
            }
            Edit::Delete(at, n) => {
                let i = boundary(&s, *at);
                let mut j = (i + n).min(s.len());
                while !s.is_char_boundary(j) {
                    j += 1;
                }
                s.replace_range(i..j, "");
            }
            Edit::Replace(at, c) => {
                let i = boundary(&s, *at);
                if let Some(old) = s[i..].chars().next() {
                    s.replace_range(i..i + old.len_utf8(), &c.to_string());
                }
            }
        }
    }
    s
}

fn check_outcome(input: &str) {
    match parse(input) {
        Ok(samples) => samples.iter().for_each(assert_valid),
        Err(ParseError::Syntax { line, what, .. }) => {
            assert!(line >= 1 && line <= input.split('\n').count());
            assert!(!what.is_empty());
        }
        Err(other) => panic!("small input refused as {other:?}"),
    }
}

/// Renders samples in the canonical text form, escaping label values.
/// A generated sample: name, labels, value, timestamp.
type Generated = (String, Vec<(String, String)>, f64, Option<i64>);

fn render(samples: &[Generated]) -> String {
    let mut out = String::new();
    for (name, labels, value, ts) in samples {
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let escaped = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                out.push_str(&format!("{k}=\"{escaped}\""));
            }
            out.push('}');
        }
        let value = match *value {
            f64::INFINITY => "+Inf".to_string(),
            f64::NEG_INFINITY => "-Inf".to_string(),
            v => format!("{v:?}"),
        };
        out.push(' ');
        out.push_str(&value);
        if let Some(ts) = ts {
            out.push_str(&format!(" {ts}"));
        }
        out.push('\n');
    }
    out
}

fn sample_strategy() -> impl Strategy<Value = Generated> {
    (
        "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}",
        proptest::collection::btree_map(
            "[a-zA-Z_][a-zA-Z0-9_]{0,10}",
            "\\PC{0,12}|[\"\\\\\n]{0,4}",
            0..5,
        ),
        prop_oneof![
            any::<f64>().prop_filter("finite", |v| v.is_finite()),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY)
        ],
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(n, l, v, t)| (n, l.into_iter().collect(), v, t))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_never_panic(input in "\\PC{0,300}") {
        check_outcome(&input);
    }

    #[test]
    fn arbitrary_bytes_as_lossy_text_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        check_outcome(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn mutated_real_pages_never_panic(
        page in 0usize..FIXTURES.len(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        check_outcome(&apply(FIXTURES[page], &edits));
    }

    #[test]
    fn rendered_samples_round_trip(samples in proptest::collection::vec(sample_strategy(), 0..20)) {
        let page = render(&samples);
        let parsed = parse(&page).unwrap();
        prop_assert_eq!(parsed.len(), samples.len());
        for (got, (name, labels, value, ts)) in parsed.iter().zip(&samples) {
            prop_assert_eq!(got.name, name.as_str());
            prop_assert_eq!(got.value, *value);
            prop_assert_eq!(got.timestamp_ms, *ts);
            let got_labels: Vec<(String, String)> = got
                .labels
                .iter()
                .map(|l| (l.name.to_string(), l.value.to_string()))
                .collect();
            prop_assert_eq!(&got_labels, labels);
        }
    }
}
