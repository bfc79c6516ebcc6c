//! `tricks export`: the TorchScript module that PyTorch (`torch.jit.load`) and libtorch's C++ API
//! (`torch::jit::load`, through tch's `CModule`) run without `tricks` gives the logits of `tricks`'
//! own forward pass on the same inputs (1e-5 in fp32), for a CIFAR ResNet, an ImageNet ResNet-D and
//! a segmentation FCN; its JSON says how to feed it; bad requests write nothing.

mod common;

use common::*;
use std::path::Path;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use tricks::config::{Config, Pipeline, Task};

/// The variables of a freshly built network, moved away from their initialisation (BN statistics
/// included, variances kept positive) so that every tensor matters.
fn perturbed(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| {
            let noisy = v.detach() + Tensor::randn_like(&v) * 0.1;
            let noisy = if k.ends_with("running_var") {
                noisy.abs() + 0.05
            } else {
                noisy
            };
            (k, noisy)
        })
        .collect()
}

/// A classification checkpoint of `cfg.model` with `classes` names (random, perturbed weights).
fn save_classifier(path: &Path, cfg: &Config, classes: &[&str]) {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = tricks::model::Classifier::new(&vs.root(), &cfg.model, classes.len() as i64).unwrap();
    let names: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    tricks::checkpoint::save(path, &perturbed(&vs), Some(cfg), &names, None).unwrap();
}

/// A segmentation checkpoint of `cfg` (random, perturbed weights).
fn save_segmenter(path: &Path, cfg: &Config) {
    tch::manual_seed(12);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = tricks::segment::SegModel::new(&vs.root(), cfg).unwrap();
    tricks::checkpoint::save(path, &perturbed(&vs), Some(cfg), &[], None).unwrap();
}

fn cifar_config() -> Config {
    let mut cfg = Config::default();
    cfg.model.name = "cifar_resnet8".into();
    cfg.data.pipeline = Pipeline::Cifar;
    cfg.data.val_size = 16;
    cfg.data.mean = [0.49, 0.48, 0.45];
    cfg.data.std = [0.25, 0.24, 0.26];
    cfg
}

fn imagenet_config() -> Config {
    let mut cfg = Config::default();
    cfg.model.name = "resnet18".into();
    cfg.model.variant = "d".into();
    cfg.data.pipeline = Pipeline::Imagenet;
    cfg.data.val_size = 64;
    cfg.data.val_crop_ratio = 0.875;
    cfg
}

fn segmentation_config() -> Config {
    let mut cfg = Config {
        task: Task::Segmentation,
        ..Config::default()
    };
    cfg.model.name = "cifar_resnet8".into();
    cfg.segment.num_classes = 3;
    cfg.segment.crop_size = 16;
    cfg.segment.class_names = vec!["road".into(), "car".into(), "sky".into()];
    cfg
}

/// `tricks`' output for images `x` in [0, 1]: the checkpoint's normalisation, then the network
/// in evaluation mode, through the library as `predict` runs it.
fn tricks_logits(ckpt: &Path, x: &Tensor) -> Tensor {
    let norm = |cfg: &Config| {
        let v = |a: [f64; 3]| Tensor::from_slice(&a.map(|v| v as f32)).view([1, 3, 1, 1]);
        (x - v(cfg.data.mean)) / v(cfg.data.std)
    };
    tch::no_grad(|| {
        if tricks::checkpoint::task_of(ckpt) == Task::Segmentation {
            let (m, _vs, cfg) = tricks::segment::load_model(ckpt, Device::Cpu).unwrap();
            m.forward_t(&norm(&cfg), false)
        } else {
            let (m, _vs, cfg, _) = tricks::model::load_model(ckpt, Device::Cpu).unwrap();
            m.forward_t(&norm(&cfg), false)
        }
    })
}

fn export(args: &[&str]) -> std::process::Output {
    let mut all = vec!["export"];
    all.extend_from_slice(args);
    run(&all)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn exported_modules_give_tricks_logits_in_pytorch_and_libtorch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cifar_classes = ["cat", "dog", "ship"];
    save_classifier(
        &dir.join("cifar.safetensors"),
        &cifar_config(),
        &cifar_classes,
    );
    let imagenet_classes = ["a", "b", "c", "d", "e"];
    save_classifier(
        &dir.join("imagenet.safetensors"),
        &imagenet_config(),
        &imagenet_classes,
    );
    save_segmenter(&dir.join("seg.safetensors"), &segmentation_config());

    // (checkpoint, extra arguments, input shape of the trace [b, 3, h, w], output shape)
    type Case<'a> = (&'a str, &'a [&'a str], [i64; 4], Vec<i64>);
    let cases: [Case; 3] = [
        ("cifar", &["--batch", "2"], [2, 3, 16, 16], vec![2, 3]),
        ("imagenet", &[], [1, 3, 64, 64], vec![1, 5]),
        (
            "seg",
            &["--size", "24x16"],
            [1, 3, 16, 24],
            vec![1, 3, 16, 24],
        ),
    ];
    let mut py_cases = Vec::new();
    for (name, extra, shape, out_shape) in &cases {
        let ckpt = dir.join(format!("{name}.safetensors"));
        let module = dir.join(format!("{name}.pt"));
        let mut args = vec![
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            module.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = export(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("TorchScript") && stdout(&o).contains("max |difference|"),
            "{}",
            stdout(&o)
        );

        // The JSON beside the module.
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(info["format"], "torchscript");
        assert_eq!(info["file"], format!("{name}.pt"));
        let got_shape: Vec<i64> = serde_json::from_value(info["input"]["shape"].clone()).unwrap();
        assert_eq!(got_shape, shape.to_vec(), "{name}");
        let got_out: Vec<i64> = serde_json::from_value(info["output"]["shape"].clone()).unwrap();
        assert_eq!(&got_out, out_shape, "{name}");
        assert_eq!(info["input"]["range"], serde_json::json!([0.0, 1.0]));
        assert!(
            info["check_max_abs_diff"].as_f64().unwrap() <= 1e-5,
            "{info}"
        );

        // Inputs in [0, 1]: the traced batch, and a batch of another size for the classifiers.
        tch::manual_seed(5);
        let x = Tensor::rand(*shape, (Kind::Float, Device::Cpu));
        let expected = tricks_logits(&ckpt, &x);
        assert_eq!(expected.size(), *out_shape);
        // libtorch's C++ API.
        let m = tch::CModule::load(&module).unwrap();
        let got = tch::no_grad(|| m.forward_ts(&[&x])).unwrap();
        let d = max_abs_diff(&got, &expected);
        assert!(d <= 1e-5, "{name}: libtorch differs by {d}");
        let mut tensors = vec![("x".to_string(), x), ("y".to_string(), expected)];
        if *name != "seg" {
            let x3 = Tensor::rand(
                [3, shape[1], shape[2], shape[3]],
                (Kind::Float, Device::Cpu),
            );
            let y3 = tricks_logits(&ckpt, &x3);
            tensors.push(("x3".into(), x3));
            tensors.push(("y3".into(), y3));
        }
        let io = dir.join(format!("{name}-io.safetensors"));
        Tensor::write_safetensors(&tensors, &io).unwrap();
        py_cases.push((module, io));
    }
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("imagenet.json")).unwrap()).unwrap();
    assert_eq!(info["preprocessing"]["resize_shorter_side"], 73);
    assert_eq!(info["preprocessing"]["center_crop"], 64);
    assert_eq!(info["classes"], serde_json::json!(imagenet_classes));
    assert_eq!(info["variant"], "d");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("seg.json")).unwrap()).unwrap();
    assert_eq!(info["task"], "segmentation");
    assert_eq!(info["classes"], serde_json::json!(["road", "car", "sky"]));
    assert_eq!(
        info["preprocessing"]["center_crop"],
        serde_json::Value::Null
    );

    // PyTorch: torch.jit.load, with nothing of tricks.
    let py = python();
    if !py.exists() {
        skip_reference("export parity in PyTorch", "no Python venv");
        return;
    }
    let script = r#"
import sys, torch
from safetensors.torch import load_file
for module, io in zip(sys.argv[1::2], sys.argv[2::2]):
    m = torch.jit.load(module)
    t = load_file(io)
    with torch.no_grad():
        for x, y in (("x", "y"), ("x3", "y3")):
            if x not in t:
                continue
            got = m(t[x])
            assert got.dtype == torch.float32 and got.shape == t[y].shape, (module, got.shape)
            d = (got - t[y]).abs().max().item()
            assert d <= 1e-5, (module, x, d)
            print(module, x, d)
"#;
    let mut cmd = std::process::Command::new(&py);
    cmd.arg("-c").arg(script);
    for (m, io) in &py_cases {
        cmd.arg(m).arg(io);
    }
    let o = cmd.output().unwrap();
    if String::from_utf8_lossy(&o.stderr).contains("No module named 'torch'") {
        skip_reference("export parity in PyTorch", "torch is not installed");
        return;
    }
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 5);

    // ONNX through scripts/to_onnx.py, checked there against the TorchScript module in
    // onnxruntime; the JSON records it.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/to_onnx.py");
    for name in ["cifar", "seg"] {
        let o = std::process::Command::new(&py)
            .arg(&script)
            .arg(dir.join(format!("{name}.pt")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("No module named 'onnx") {
            skip_reference("ONNX export", "onnx / onnxruntime are not installed");
            return;
        }
        assert!(o.status.success(), "{name}: {err}");
        assert!(dir.join(format!("{name}.onnx")).is_file());
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(info["onnx"]["file"], format!("{name}.onnx"));
        assert!(info["onnx"]["check_max_abs_diff"].as_f64().unwrap() < 1e-4);
    }
}

#[test]
fn a_bf16_export_stays_close_to_fp32_and_keeps_float_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ckpt = dir.join("cifar.safetensors");
    save_classifier(&ckpt, &cifar_config(), &["cat", "dog", "ship"]);
    let module = dir.join("bf16.pt");
    let o = export(&[
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        module.to_str().unwrap(),
        "--precision",
        "bf16",
        "--batch",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bf16.json")).unwrap()).unwrap();
    assert_eq!(info["precision"], "bf16");
    tch::manual_seed(6);
    let x = Tensor::rand([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let expected = tricks_logits(&ckpt, &x);
    let got = tch::no_grad(|| tch::CModule::load(&module).unwrap().forward_ts(&[&x])).unwrap();
    assert_eq!(got.kind(), Kind::Float);
    let scale = f64::try_from(expected.abs().max()).unwrap();
    let d = max_abs_diff(&got, &expected);
    // bf16 keeps 8 bits of mantissa: a few per cent of the logits' scale through eight layers.
    assert!(
        d > 0.0 && d <= 0.05 * scale,
        "bf16 differs by {d} (scale {scale})"
    );
}

#[test]
fn bad_export_requests_are_refused_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ckpt = dir.join("cifar.safetensors");
    save_classifier(&ckpt, &cifar_config(), &["cat", "dog", "ship"]);
    let out = dir.join("out.pt");
    let not_a_checkpoint = dir.join("notes.txt");
    std::fs::write(&not_a_checkpoint, "hello").unwrap();
    let c = ckpt.to_str().unwrap();
    let o = out.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["--checkpoint", c, "--out", o, "--precision", "fp16"],
            "fp16",
        ),
        (
            vec!["--checkpoint", c, "--out", o, "--precision", "int8"],
            "int8",
        ),
        (
            vec!["--checkpoint", c, "--out", o, "--size", "4"],
            "too small",
        ),
        (
            vec!["--checkpoint", c, "--out", o, "--size", "big"],
            "not a size",
        ),
        (vec!["--checkpoint", c, "--out", o, "--batch", "0"], "batch"),
        (
            vec![
                "--checkpoint",
                not_a_checkpoint.to_str().unwrap(),
                "--out",
                o,
            ],
            "notes.txt",
        ),
        (
            vec![
                "--checkpoint",
                dir.join("missing.safetensors").to_str().unwrap(),
                "--out",
                o,
            ],
            "missing.safetensors",
        ),
    ] {
        let r = export(&args);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(stderr(&r).contains(expect), "{args:?}: {}", stderr(&r));
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}
