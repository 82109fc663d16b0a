//! Model rewrites: which served model a requested model name becomes.
//!
//! Precedence follows the GIE: a rule naming the model exactly beats a catch-all rule (one
//! with no matches); among equals the older resource wins, then the earlier rule. The
//! target is drawn by weight with the caller's RNG.

use rand::{Rng, RngCore};

use crate::objective::{Rewrite, RewriteRule};

/// The rule that applies to `model`, if any. `rewrites` must be in precedence order.
pub fn rule_for<'a>(rewrites: &'a [Rewrite], model: &str) -> Option<&'a RewriteRule> {
    let rules = || rewrites.iter().flat_map(|r| r.rules.iter());
    rules()
        .find(|r| r.matches.iter().any(|m| m == model))
        .or_else(|| rules().find(|r| r.matches.is_empty()))
}

/// Draw the served model for `model`; `None` when no rule applies.
pub fn choose<'a>(rewrites: &'a [Rewrite], model: &str, rng: &mut dyn RngCore) -> Option<&'a str> {
    let rule = rule_for(rewrites, model)?;
    let total: u64 = rule.targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return rule.targets.first().map(|t| t.model.as_str());
    }
    let mut x = rng.random_range(0..total);
    for t in &rule.targets {
        let w = u64::from(t.weight);
        if x < w {
            return Some(&t.model);
        }
        x -= w;
    }
    rule.targets.last().map(|t| t.model.as_str())
}

/// Replaces the JSON value of every `"model"` key equal to `from` by `to`, leaving every other
/// byte as it was: how both front ends name, in a response, the model the client asked for
/// after a rewrite (DESIGN.md 4.1).
pub fn map_model_back(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    let from_lit = serde_json::to_string(from).unwrap_or_default();
    let to_lit = serde_json::to_string(to).unwrap_or_default();
    let key = b"\"model\"";
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let Some(pos) = find(&body[i..], key) else {
            break;
        };
        let key_end = i + pos + key.len();
        let mut j = key_end;
        while j < body.len() && body[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < body.len() && body[j] == b':' {
            j += 1;
            while j < body.len() && body[j].is_ascii_whitespace() {
                j += 1;
            }
            if body[j..].starts_with(from_lit.as_bytes()) {
                out.extend_from_slice(&body[i..j]);
                out.extend_from_slice(to_lit.as_bytes());
                i = j + from_lit.len();
                continue;
            }
        }
        out.extend_from_slice(&body[i..key_end]);
        i = key_end;
    }
    out.extend_from_slice(&body[i..]);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_mapped_back_in_json_and_sse() {
        assert_eq!(
            map_model_back(
                br#"{"id":"1","model":"v2","x":{"model" : "v2"},"y":"model"}"#,
                "v2",
                "public"
            ),
            br#"{"id":"1","model":"public","x":{"model" : "public"},"y":"model"}"#.to_vec()
        );
        assert_eq!(
            map_model_back(br#"{"model":"v22"}"#, "v2", "p"),
            br#"{"model":"v22"}"#.to_vec()
        );
    }
    use crate::objective::RewriteTarget;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn mk_rewrite(source: &str, matches: &[&str], targets: &[(&str, u32)]) -> Rewrite {
        Rewrite {
            source: source.into(),
            rules: vec![RewriteRule {
                matches: matches.iter().map(|s| s.to_string()).collect(),
                targets: targets
                    .iter()
                    .map(|(m, w)| RewriteTarget {
                        model: m.to_string(),
                        weight: *w,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn exact_match_beats_older_catch_all() {
        let rw = vec![
            mk_rewrite("old", &[], &[("fallback", 1)]),
            mk_rewrite("new", &["llama"], &[("llama-v2", 1)]),
        ];
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(choose(&rw, "llama", &mut rng), Some("llama-v2"));
        assert_eq!(choose(&rw, "other", &mut rng), Some("fallback"));
    }

    #[test]
    fn older_exact_match_wins_over_newer() {
        let rw = vec![
            mk_rewrite("a", &["m"], &[("first", 1)]),
            mk_rewrite("b", &["m"], &[("second", 1)]),
        ];
        assert_eq!(
            choose(&rw, "m", &mut SmallRng::seed_from_u64(1)),
            Some("first")
        );
    }

    #[test]
    fn no_rule_means_no_rewrite() {
        let rw = vec![mk_rewrite("a", &["m"], &[("x", 1)])];
        assert_eq!(choose(&rw, "other", &mut SmallRng::seed_from_u64(1)), None);
    }

    #[test]
    fn weights_split_traffic() {
        let rw = vec![mk_rewrite("a", &["m"], &[("v1", 70), ("v2", 30)])];
        let mut rng = SmallRng::seed_from_u64(9);
        let n = 10_000;
        let v1 = (0..n)
            .filter(|_| choose(&rw, "m", &mut rng) == Some("v1"))
            .count();
        let share = v1 as f64 / n as f64;
        assert!((0.68..0.72).contains(&share), "{share}");
    }
}
