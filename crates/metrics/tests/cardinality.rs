//! Clients choose model names; the metrics must not grow with every name they invent.

use infergate_metrics::{Metrics, RequestLabels, MAX_MODEL_LABELS, OTHER_MODEL};

#[test]
fn model_names_past_the_bound_are_counted_as_other() {
    let m = Metrics::new("pool");
    for i in 0..MAX_MODEL_LABELS + 1_000 {
        let l = m.model_labels(&format!("model-{i}"), "served");
        m.request_total
            .get_or_create(&RequestLabels {
                model_name: l.model_name,
                target_model_name: l.target_model_name,
                priority: "0".into(),
            })
            .inc();
    }
    // "served" took one of the slots, so MAX - 1 invented names kept their own series.
    let text = m.encode();
    let series = text
        .lines()
        .filter(|l| l.starts_with("inference_objective_request_total{"))
        .count();
    assert_eq!(series, MAX_MODEL_LABELS);
    assert!(text.contains(&format!("model_name=\"{OTHER_MODEL}\"")));
    // Names seen before the bound keep their label; new ones go to `other`.
    assert_eq!(m.model_labels("model-0", "served").model_name, "model-0");
    assert_eq!(
        m.model_labels("model-99999", "served").model_name,
        OTHER_MODEL
    );
    assert_eq!(m.model_labels("", "served").model_name, "");
}
