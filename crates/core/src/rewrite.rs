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

#[cfg(test)]
mod tests {
    use super::*;
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
