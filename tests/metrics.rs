//! Metrics against scikit-learn golden values (scripts/metrics/make_golden.py).

use mpcs::metrics::{evaluate, majority_vote, Prediction};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn metrics_match_sklearn() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics/sklearn.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let k = case["classes"].as_u64().unwrap() as usize;
        let u =
            |key: &str| case[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect::<Vec<_>>();
        let f = |key: &str| case[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>();
        let (labels, predicted) = (u("labels"), u("predicted"));
        let groups: Vec<String> =
            case["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
        let preds: Vec<Prediction> = (0..labels.len())
            .map(|i| Prediction { label: labels[i], predicted: predicted[i], group: Some(groups[i].clone()) })
            .collect();
        let r = evaluate(&preds, k).unwrap();
        assert!(close(r.accuracy, case["accuracy"].as_f64().unwrap()));
        assert!(
            close(r.weighted_f1, case["weighted_f1"].as_f64().unwrap()),
            "{} vs {}",
            r.weighted_f1,
            case["weighted_f1"]
        );
        assert!(close(r.patient_accuracy.unwrap(), case["patient_accuracy"].as_f64().unwrap()));
        for (c, s) in r.per_class.iter().enumerate() {
            assert!(
                close(s.precision, f("precision")[c]) && close(s.recall, f("recall")[c]) && close(s.f1, f("f1")[c])
            );
            assert_eq!(s.support as u32, u("support")[c]);
        }
        let conf: Vec<Vec<usize>> = case["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect())
            .collect();
        assert_eq!(r.confusion, conf);
        let voted = majority_vote(&preds, k);
        assert_eq!(voted.iter().map(|p| p.predicted).collect::<Vec<_>>(), u("vote_predicted"));
        assert_eq!(voted.iter().map(|p| p.label).collect::<Vec<_>>(), u("vote_labels_first"));
    }
}

#[test]
fn bad_input_is_an_error() {
    assert!(evaluate(&[], 2).is_err());
    let p = Prediction { label: 3, predicted: 0, group: None };
    assert!(evaluate(&[p], 2).unwrap_err().contains("outside 0..2"));
}
