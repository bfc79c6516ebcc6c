//! Detection end to end through the CLI, on generated data: a tiny Faster R-CNN trains
//! (metrics.jsonl with the four loss terms and COCO figures, checkpoints, summary), `tricks eval`
//! gives the figures of the run's own evaluation, `tricks predict` draws and prints boxes, a run
//! killed with SIGKILL resumes bit-identically, a classification checkpoint initialises the
//! backbone, and the shipped configs and study are valid.

mod common;

use common::{detection_config, detection_folder, run, stderr, stdout, train};
use std::path::Path;
use tricks::detect;

#[test]
fn tiny_detector_trains_evaluates_and_predicts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let [_, val_objects] = detection_folder(&data, 8, 4, 96, 80);
    let cfg = detection_config(tmp.path(), &data, 2, "");
    let out = tmp.path().join("run");
    train(&cfg, &out, &[]);

    // metrics.jsonl: the four loss terms add up to the training loss; COCO figures in %.
    let ms = detect::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(ms.len(), 2);
    for m in &ms {
        let terms = m.train_loss_objectness
            + m.train_loss_rpn_box_reg
            + m.train_loss_classifier
            + m.train_loss_box_reg;
        assert!(
            (terms - m.train_loss).abs() < 1e-4 * m.train_loss.max(1.0),
            "terms {terms} vs loss {}",
            m.train_loss
        );
        assert!(m.train_loss_objectness > 0.0 && m.train_loss_classifier > 0.0);
        let map = m.val_map.expect("every epoch is evaluated");
        assert!((0.0..=100.0).contains(&map), "{map}");
        assert!(m.val_ap50.unwrap() >= map);
        assert!(m.val_loss.is_none(), "detection evaluation has no loss");
    }
    let summary: detect::DetSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary.epochs, 2);
    assert_eq!(summary.final_map, ms[1].val_map.unwrap());
    assert!(summary.best_map >= summary.final_map);
    for f in [
        "best.safetensors",
        "config.toml",
        "checkpoints/epoch-0002.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(out.join("tb").is_dir());

    // `tricks eval` on the last epoch's weights: the run's own evaluation of epoch 2.
    let last = out.join("checkpoints/epoch-0002.safetensors");
    let o = run(&["eval", "--checkpoint", last.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("mAP {:.2}%", ms[1].val_map.unwrap())),
        "{text}"
    );
    assert!(text.contains("(4 images"), "{text}");
    assert!(text.contains("AP @[IoU=0.50:0.95 | area=   all | maxDets=100]"));
    // `--split train`: the 8 training images instead; a split that is not there is named.
    let o = run(&[
        "eval",
        "--checkpoint",
        last.to_str().unwrap(),
        "--split",
        "train",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(8 images"), "{}", stdout(&o));
    let o = run(&[
        "eval",
        "--checkpoint",
        last.to_str().unwrap(),
        "--split",
        "nosuch",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("nosuch"),
        "{}",
        stderr(&o)
    );

    // `tricks predict`: a PNG of the image's size with boxes drawn, and JSON.
    let img = data.join("images/val/0001.png");
    let drawn = tmp.path().join("boxes.png");
    let o = run(&[
        "predict",
        "--checkpoint",
        last.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--out",
        drawn.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let picture = image::open(&drawn).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (112, 80));
    let o = run(&[
        "predict",
        "--checkpoint",
        last.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(112), Some(80))
    );
    let dets = v["detections"].as_array().unwrap();
    assert!(dets.len() <= 100);
    let mut last_score = f64::INFINITY;
    for d in dets {
        let class = d["class"].as_str().unwrap();
        assert!(class == "red" || class == "blue", "{class}");
        let score = d["score"].as_f64().unwrap();
        assert!(score <= last_score && score >= 0.01);
        last_score = score;
        let b: Vec<f64> = serde_json::from_value(d["bbox"].clone()).unwrap();
        assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 112.0 && b[3] <= 80.0 && b[0] <= b[2]);
    }
    assert!(val_objects > 0);
    // A detector is not exported (its NMS does not trace), and saying so writes nothing.
    let module = tmp.path().join("detector.pt");
    let o = run(&[
        "export",
        "--checkpoint",
        last.to_str().unwrap(),
        "--out",
        module.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("a detection checkpoint"));
    assert!(!module.exists() && !tmp.path().join("detector.json").exists());
}

/// kill -9 after the first epoch's checkpoint, then `--resume`: the run ends bit-identical to a
/// straight one, the samplers' draws and the loader's augmentation included.
#[test]
fn resume_after_kill_9_is_bit_identical_to_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    detection_folder(&data, 24, 2, 96, 80);
    let cfg = detection_config(tmp.path(), &data, 3, "");
    let c = cfg.to_str().unwrap();
    let straight = tmp.path().join("straight");
    train(&cfg, &straight, &[]);
    let killed = tmp.path().join("killed");
    common::kill_after_first_epoch(c, &killed, std::time::Duration::from_millis(100));
    common::resume(c, &killed);
    common::assert_same_weights(&straight, &killed, 3);
    let ma = detect::read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let mb = detect::read_metrics(&killed.join("metrics.jsonl")).unwrap();
    assert_eq!(ma.len(), 3);
    assert_eq!(
        ma.iter()
            .map(|m| (m.train_loss, m.task.clone()))
            .collect::<Vec<_>>(),
        mb.iter()
            .map(|m| (m.train_loss, m.task.clone()))
            .collect::<Vec<_>>()
    );
}

/// `tricks finetune --from CLASSIFICATION_CKPT` with a detection config starts the backbone
/// from the classification network's weights (its `fc` dropped) and the heads at random.
#[test]
fn a_classification_checkpoint_initialises_the_backbone() {
    let tmp = tempfile::tempdir().unwrap();
    // A ResNet-18-D classification checkpoint (random weights) saved as this project saves them.
    let mut cls_cfg = tricks::config::Config::default();
    cls_cfg.model.name = "resnet18".into();
    cls_cfg.model.variant = "d".into();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    tch::manual_seed(11);
    let _ = tricks::model::Classifier::new(&vs.root(), &cls_cfg.model, 3).unwrap();
    let ckpt = tmp.path().join("cls.safetensors");
    let tensors: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    tricks::checkpoint::save(&ckpt, &tensors, Some(&cls_cfg), &classes, None).unwrap();
    let data = tmp.path().join("data");
    detection_folder(&data, 4, 2, 96, 80);
    let cfg = detection_config(tmp.path(), &data, 1, "");
    let out = tmp.path().join("run");
    let o = run(&[
        "finetune",
        "--from",
        ckpt.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "detect.trainable_layers=0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("backbone initialised from"),
        "{}",
        stderr(&o)
    );
    // With no backbone stage trained (and batch norm frozen) the backbone after the epoch is
    // the classification network's.
    let det = tricks::checkpoint::load(&out.join("checkpoints/epoch-0001.safetensors")).unwrap();
    let vars = vs.variables();
    let mut n = 0;
    for (name, v) in &vars {
        if name.starts_with("fc.") {
            continue;
        }
        let t = &det.tensors[&format!("backbone.body.{name}")];
        assert!(t.equal(v), "{name} was not copied");
        n += 1;
    }
    assert!(n > 50, "{n}");
    assert!(!det.tensors.keys().any(|k| k.contains("fc.")));
}

#[test]
fn detection_config_keys_are_validated_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = detection_config(tmp.path(), &data, 1, "");
    for (set, key) in [
        ("detect.rpn_fg_iou_thresh=1.5", "detect.rpn_fg_iou_thresh"),
        ("detect.trainable_layers=6", "detect.trainable_layers"),
        ("detect.min_size=[]", "detect.min_size"),
        ("detect.anchor_sizes=[32.0, 64.0]", "detect.anchor_sizes"),
        ("detect.box_bg_iou_thresh=0.6", "detect.box_bg_iou_thresh"),
        ("model.name=\"cifar_resnet20\"", "model.name"),
        ("mixup.alpha=0.2", "mixup.alpha"),
        ("data.format=\"imagefolder\"", "data.format"),
    ] {
        let e = format!(
            "{:#}",
            tricks::recipe::load(&cfg, &[set.into()]).unwrap_err()
        );
        assert!(e.contains(key), "{set}: {e}");
    }
    // An annotation format with another task.
    let e = format!(
        "{:#}",
        tricks::recipe::from_toml_str("[data]\nformat = \"coco\"\n", &[]).unwrap_err()
    );
    assert!(e.contains("data.format") && e.contains("detection"), "{e}");
}

#[test]
fn shipped_detection_configs_and_the_transfer_study_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for p in [
        "configs/coco128/fasterrcnn_resnet18d.toml",
        "configs/voc/fasterrcnn_resnet50d.toml",
    ] {
        let c = tricks::recipe::load(&root.join(p), &[]).unwrap_or_else(|e| panic!("{p}: {e:#}"));
        assert_eq!(c.task, tricks::config::Task::Detection, "{p}");
    }
    let study =
        tricks::experiments::Study::load(&root.join("studies/transfer_detection.toml")).unwrap();
    assert!(study.variants.len() >= 4);
    let backbones: std::collections::BTreeSet<&str> = study
        .variants
        .iter()
        .map(|v| v.config.detect.backbone.as_str())
        .collect();
    assert_eq!(backbones.len(), study.variants.len());
}
