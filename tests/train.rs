//! Training loops end to end on a tiny synthetic BreakHis: fine-tuning learns, pretraining loss falls,
//! checkpoints resume, bad inputs give clear errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mpcs::data::synth::{generate_with, SynthOptions};
use mpcs::data::{scan, Dataset};
use mpcs::train::{
    evaluate, finetune, pretrain, EvalConfig, FinetuneConfig, Init, PretrainConfig, TrainError, TrainEvent,
};

/// A synthetic BreakHis (24 patients, 3 regions each, 70×46) and its fold 0 manifest, made once per test binary.
fn data() -> &'static (PathBuf, PathBuf) {
    static DATA: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let root = dir.join("breakhis");
        let opts = SynthOptions { patients: Some(24), size: Some((70, 46)), ..SynthOptions::new(Dataset::BreakHis, 1) };
        generate_with(&opts, &root).unwrap();
        let records = scan(Dataset::BreakHis, &root, false).unwrap();
        let folds = mpcs::split::split(Dataset::BreakHis, &records, 5, 1).unwrap();
        let csv = dir.join("fold_0.csv");
        std::fs::write(&csv, mpcs::split::rows_csv(&folds[0].rows)).unwrap();
        (root, csv)
    })
}

fn ft_config(out: &Path, size: usize, epochs: usize) -> FinetuneConfig {
    let (root, csv) = data();
    let mut c = FinetuneConfig::new(root, csv, &out.join("out"), &out.join("scratch"));
    c.image_size = size;
    c.epochs = epochs;
    c.batch_size = 16;
    c.lr = 1e-3;
    c
}

fn quiet(_: TrainEvent) {}

#[test]
fn finetune_learns_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ft_config(tmp.path(), 32, 8);
    cfg.magnification = None;
    let out = finetune(&cfg, &quiet).unwrap();
    assert_eq!(out.epochs_done, 8);
    let lines = std::fs::read_to_string(&out.metrics).unwrap();
    eprintln!("{lines}");
    assert_eq!(lines.lines().count(), 8);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "images_per_s"] {
        assert!(first[k].is_number(), "{k} missing in {first}");
    }

    let (root, csv) = data();
    let mut ec = EvalConfig::new(root, csv, &out.model, &tmp.path().join("eval"));
    ec.image_size = 32;
    let ev = evaluate(&ec).unwrap();
    eprintln!(
        "test images {} accuracy {:.3} patient accuracy {:?} weighted F1 {:.3} majority rate {:.3}",
        ev.report.images, ev.report.accuracy, ev.report.patient_accuracy, ev.report.weighted_f1, ev.majority_rate
    );
    // Seeded initialisation makes this run reproducible (1.000 here on 2 cores); the project's target is 0.85.
    assert!(ev.report.accuracy >= 0.85, "{:?} vs majority {}", ev.report, ev.majority_rate);
    assert!(ev.report.patient_accuracy.is_some());
    let preds = std::fs::read_to_string(&ev.predictions).unwrap();
    assert_eq!(preds.lines().count(), ev.report.images + 1);
    assert!(ev.metrics.exists());
}

#[test]
fn pretraining_loss_falls() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, csv) = data();
    let mut cfg = PretrainConfig::new(root, csv, &tmp.path().join("out"), &tmp.path().join("scratch"));
    cfg.image_size = 32;
    cfg.batch_size = 14;
    cfg.epochs = 6;
    cfg.lr = 3e-4;
    cfg.projector_hidden = 128;
    let out = pretrain(&cfg, &quiet).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(&out.losses)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    eprintln!("regions {} losses {losses:?}", out.regions);
    assert_eq!(losses.len(), 6);
    // Single epochs are noisy (three batches of 14 contrastive pairs; one later epoch can jump back up by
    // 0.8): the mean of the last three epochs must be well below the first epoch's loss (the untrained one).
    assert!(losses[3..].iter().sum::<f64>() / 3.0 < losses[0] * 0.9, "{losses:?}");
    // The backbone is a plain torchvision encoder: it loads as fine-tuning init (fc ignored).
    let names = mpcs::nn::weights::read_tensors(&out.backbone).unwrap();
    assert!(names.keys().all(|k| !k.starts_with("fc.") && !k.starts_with("projector")));
    assert!(names.contains_key("conv1.weight"));
    // A linear probe (frozen encoder, only the head trains) on the MPCS features beats one on the features of
    // the same encoder at its random initialisation.
    let probe = |init: Init, name: &str| {
        let mut c = ft_config(&tmp.path().join(name), 32, 10);
        c.freeze_encoder = true;
        c.lr = 1e-2;
        c.augment = false;
        c.init = init;
        let o = finetune(&c, &quiet).unwrap();
        let (root, csv) = data();
        let mut ec = EvalConfig::new(root, csv, &o.model, &tmp.path().join(name).join("eval"));
        ec.image_size = 32;
        evaluate(&ec).unwrap().report.accuracy
    };
    let mpcs_acc = probe(Init::Weights(out.backbone.clone()), "probe-mpcs");
    let random_acc = probe(Init::Random, "probe-random");
    eprintln!("linear probe test accuracy: MPCS {mpcs_acc:.3}, random init {random_acc:.3}");
    assert!(mpcs_acc > random_acc, "MPCS {mpcs_acc} vs random {random_acc}");
}

#[test]
fn linear_eval_trains_only_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ft_config(tmp.path(), 16, 1);
    c.freeze_encoder = true;
    c.lr = 1e-2;
    let before = tmp.path().join("init.safetensors");
    {
        // The same seeded encoder the run starts from.
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
        mpcs::nn::ResNet::new(mpcs::nn::Arch::ResNet18, vb, None, mpcs::nn::Dilation::None).unwrap();
        mpcs::train::seeded_init(&vm, c.seed).unwrap();
        mpcs::nn::weights::save(&vm, &before).unwrap();
    }
    let o = finetune(&c, &quiet).unwrap();
    let a = mpcs::nn::weights::read_tensors(&before).unwrap();
    let b = mpcs::nn::weights::read_tensors(&o.model).unwrap();
    let mut compared = 0;
    for (name, t) in &a {
        let u = &b[name];
        let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let diff = (f32(t) - f32(u))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Encoder weights and BatchNorm statistics are untouched (eval mode, no gradient).
        assert_eq!(diff, 0.0, "{name} changed under linear evaluation");
        compared += 1;
    }
    assert!(compared > 100);
    assert!(b.contains_key("fc.weight") && !a.contains_key("fc.weight"));
}

#[test]
fn a_diverging_resume_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ft_config(tmp.path(), 16, 1);
    finetune(&cfg, &quiet).unwrap();
    let scratch = &cfg.scratch_dir;
    // A schedule gone wrong: the checkpointed learning rate is absurd, so epoch 2 diverges.
    let state_path = scratch.join("state.json");
    let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let best_path = scratch.join(state["best_weights"].as_str().unwrap());
    let best = std::fs::read(&best_path).unwrap();
    state["lr"] = serde_json::json!(1e30);
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let cfg2 = FinetuneConfig { epochs: 2, magnification: None, ..cfg.clone() };
    match finetune(&cfg2, &quiet) {
        Err(e @ TrainError::NonFiniteLoss { epoch: 2, .. }) => {
            assert!(e.to_string().contains("epoch 2") && e.to_string().contains("last good checkpoint"), "{e}")
        }
        other => panic!("expected a non-finite loss in epoch 2, got {other:?}"),
    }
    // The checkpoint of epoch 1 and the best model are still there, unchanged.
    let after: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(after["epochs_done"], 1);
    assert_eq!(after["best_weights"], state["best_weights"]);
    assert_eq!(std::fs::read(&best_path).unwrap(), best);
}

#[test]
fn resume_runs_only_the_missing_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ft_config(tmp.path(), 16, 2);
    let a = finetune(&cfg, &quiet).unwrap();
    assert_eq!((a.epochs_done, a.epochs_run, a.resumed_after), (2, 2, None));
    let cfg4 = FinetuneConfig { epochs: 4, ..cfg };
    let seen = std::cell::RefCell::new(Vec::new());
    let b = finetune(&cfg4, &|e| {
        if let TrainEvent::Epoch { epoch, .. } = e {
            seen.borrow_mut().push(epoch)
        }
    })
    .unwrap();
    assert_eq!((b.epochs_done, b.epochs_run, b.resumed_after), (4, 2, Some(2)));
    assert_eq!(*seen.borrow(), vec![3, 4]);
    let epochs: Vec<u64> = std::fs::read_to_string(&b.metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, vec![1, 2, 3, 4]);
    // Asking again for 4 runs nothing.
    let c = finetune(&cfg4, &quiet).unwrap();
    assert_eq!(c.epochs_run, 0);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ft_config(tmp.path(), 16, 1);

    cfg.train_portion = "nope".into();
    let e = finetune(&cfg, &quiet).unwrap_err().to_string();
    assert!(e.contains("portion 'nope' has no images") && e.contains("train_60"), "{e}");
    cfg.train_portion = "train_60".into();

    cfg.magnification = Some("40".into());
    cfg.batch_size = 10_000;
    let e = finetune(&cfg, &quiet).unwrap_err().to_string();
    assert!(e.contains("batch_size 10000 exceeds the") && e.contains("lower batch_size"), "{e}");
    cfg.batch_size = 16;

    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a weights file at all").unwrap();
    cfg.init = Init::Weights(junk.clone());
    let e = finetune(&cfg, &quiet).unwrap_err();
    assert!(matches!(e, TrainError::Nn(_)), "{e:?}");
    assert!(e.to_string().contains("junk.safetensors"), "{e}");

    // A checkpoint of another architecture: a shape mismatch that names the tensor.
    let other = tmp.path().join("resnet34.safetensors");
    {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &candle_core::Device::Cpu);
        mpcs::nn::ResNet::new(mpcs::nn::Arch::ResNet34, vb, None, mpcs::nn::Dilation::None).unwrap();
        mpcs::nn::weights::save(&vm, &other).unwrap();
    }
    cfg.init = Init::Weights(other);
    let e = finetune(&cfg, &quiet).unwrap_err().to_string();
    assert!(e.contains("resnet34"), "{e}");
    cfg.init = Init::Random;

    // A diverging run stops with an error naming the epoch.
    cfg.lr = 1e30;
    cfg.magnification = None;
    cfg.scratch_dir = tmp.path().join("nan-scratch");
    match finetune(&cfg, &quiet) {
        Err(TrainError::NonFiniteLoss { epoch, .. }) => assert_eq!(epoch, 1),
        other => panic!("expected a non-finite loss, got {other:?}"),
    }

    // Evaluation without a model.
    let (root, csv) = data();
    let ec = EvalConfig::new(root, csv, &tmp.path().join("missing.safetensors"), &tmp.path().join("eval"));
    let e = evaluate(&ec).unwrap_err().to_string();
    assert!(e.contains("run fine-tuning first"), "{e}");
}

/// The scratch folder keeps the newest checkpoint and the one before it, and nothing older. A damaged file that a
/// checkpoint relies on (here a pretraining bucket, published from the scratch folder at the end) makes that
/// checkpoint unusable: it is reported and set aside, and training resumes from the previous one, which does not
/// rely on the file, and writes the file again (issue 13 B3).
#[test]
fn a_damaged_bucket_falls_back_to_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, csv) = data();
    let mut cfg = PretrainConfig::new(root, csv, &tmp.path().join("out"), &tmp.path().join("scratch"));
    cfg.image_size = 16;
    cfg.batch_size = 14;
    cfg.epochs = 3;
    cfg.projector_hidden = 32;
    cfg.buckets = vec![2, 3];
    pretrain(&cfg, &quiet).unwrap();
    let scratch = &cfg.scratch_dir;
    let state = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(scratch.join(name)).unwrap()).unwrap()
    };
    let (newest, prev) = (state("state.json"), state("state.prev.json"));
    assert_eq!((newest["epochs_done"].as_u64(), prev["epochs_done"].as_u64()), (Some(3), Some(2)));
    let mut files: Vec<String> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    let mut named: Vec<String> = [&newest, &prev]
        .iter()
        .flat_map(|s| [s["weights"].as_str().unwrap().to_string(), s["best_weights"].as_str().unwrap().to_string()])
        .collect();
    named.sort();
    named.dedup();
    assert_eq!(files, named, "only the model files of the two kept checkpoints remain");

    let bucket = scratch.join("buckets/epoch_3.safetensors");
    let bytes = std::fs::read(&bucket).unwrap();
    std::fs::write(&bucket, &bytes[..bytes.len() / 2]).unwrap();
    let warnings = std::cell::RefCell::new(Vec::new());
    let out = pretrain(&cfg, &|e| {
        if let TrainEvent::Warning { message } = e {
            warnings.borrow_mut().push(message)
        }
    })
    .unwrap();
    let warnings = warnings.into_inner().join("\n");
    assert!(warnings.contains("epoch_3.safetensors") && warnings.contains("set aside"), "{warnings}");
    assert!(warnings.contains("resuming from the checkpoint after epoch 2"), "{warnings}");
    assert_eq!((out.resumed_after, out.epochs_run), (Some(2), 1));
    assert!(mpcs::nn::weights::read_tensors(&out.buckets[1].1).is_ok(), "bucket 3 was written again");
}
