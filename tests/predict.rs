//! `tricks predict` with a classification checkpoint: a tiny model trained on generated images
//! classifies images it has not seen (a folder with a nested sub-folder and a corrupt file, single
//! files, a list), as a table, JSON lines or CSV.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image's top classes as `--json` prints them.
#[derive(Debug, Clone, PartialEq)]
struct Top {
    path: String,
    classes: Vec<(String, f64)>,
}

fn json_lines(out: &str) -> Vec<Top> {
    out.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            Top {
                path: v["path"].as_str().unwrap().to_string(),
                classes: v["topk"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| {
                        (
                            c["class"].as_str().unwrap().to_string(),
                            c["probability"].as_f64().unwrap(),
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The predictions by path, checked to be a distribution's top k, most probable first.
fn by_path(tops: &[Top], k: usize) -> BTreeMap<String, Top> {
    for t in tops {
        assert_eq!(t.classes.len(), k, "{t:?}");
        let sum: f64 = t.classes.iter().map(|c| c.1).sum();
        assert!(sum <= 1.0 + 1e-5, "{t:?}");
        assert!(
            t.classes.iter().all(|c| (0.0..=1.0).contains(&c.1)),
            "{t:?}"
        );
        assert!(t.classes.windows(2).all(|w| w[0].1 >= w[1].1), "{t:?}");
    }
    tops.iter().map(|t| (t.path.clone(), t.clone())).collect()
}

fn same_predictions(a: &Top, b: &Top) {
    assert_eq!(a.classes.len(), b.classes.len());
    for (x, y) in a.classes.iter().zip(&b.classes) {
        assert_eq!(x.0, y.0, "{a:?} vs {b:?}");
        assert!((x.1 - y.1).abs() < 1e-4, "{a:?} vs {b:?}");
    }
}

/// The class an image was generated as, from its name (`c<class>_<index>.<ext>`).
fn true_class(path: &str) -> String {
    let name = Path::new(path).file_name().unwrap().to_str().unwrap();
    format!("class{}", &name[1..2])
}

#[test]
fn predict_classifies_folders_files_and_lists_and_names_unreadable_images() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    image_folder(&data, 3, 16, 4, 16);
    let cfg = tiny_config(tmp.path(), &data, 4, "");
    let out = tmp.path().join("run");
    let o = run(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = out.join("best.safetensors");
    let ckpt = ckpt.to_str().unwrap();

    // Images of known class the training never saw (other indices), some in a nested folder and
    // some larger than the training size (resized and centre-cropped by the eval transform),
    // and a corrupt .jpg.
    let pred = tmp.path().join("pred");
    let nested = pred.join("more").join("deeper");
    std::fs::create_dir_all(&nested).unwrap();
    let mut files: Vec<PathBuf> = Vec::new();
    for c in 0..3 {
        for i in 40..48 {
            let (dir, size) = if i % 4 == 0 {
                (&nested, 24)
            } else {
                (&pred, 16)
            };
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            let path = dir.join(format!("c{c}_{i}.{ext}"));
            class_image(c, i, size).save(&path).unwrap();
            files.push(path);
        }
    }
    std::fs::write(
        pred.join("broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(pred.join("notes.txt"), "not an image").unwrap();
    let n = files.len();

    // The folder, as JSON lines: the corrupt file is named and the exit status is 1.
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--image",
        pred.to_str().unwrap(),
        "--json",
        "--topk",
        "2",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.jpg"), "{err}");
    assert!(
        err.contains(&format!("1 of {} images could not be read", n + 1)),
        "{err}"
    );
    let folder = by_path(&json_lines(&stdout(&o)), 2);
    assert_eq!(folder.len(), n, "{}", stdout(&o));
    let right = folder
        .values()
        .filter(|t| t.classes[0].0 == true_class(&t.path))
        .count();
    let accuracy = right as f64 / n as f64;
    eprintln!(
        "top-1 of the tiny model on {n} new images: {:.1}%",
        100.0 * accuracy
    );
    assert!(accuracy >= 0.9, "top-1 {right} of {n}: {folder:#?}");

    // --topk beyond the class count is clipped to it: the whole distribution.
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--image",
        files[0].to_str().unwrap(),
        "--json",
        "--topk",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = json_lines(&stdout(&o));
    by_path(&all, 3);
    let sum: f64 = all[0].classes.iter().map(|c| c.1).sum();
    assert!((sum - 1.0).abs() < 1e-4, "{all:?}");

    // CSV: a header and one row per readable image, as the JSON said; small batches give the
    // same predictions.
    let csv = tmp.path().join("pred.csv");
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--image",
        pred.to_str().unwrap(),
        "--topk",
        "2",
        "--csv",
        csv.to_str().unwrap(),
        "--batch-size",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("path,class_1,probability_1,class_2,probability_2")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), n, "{text}");
    for row in rows {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!(f.len(), 5, "{row}");
        let t = &folder[f[0]];
        same_predictions(
            t,
            &Top {
                path: f[0].to_string(),
                classes: vec![
                    (f[1].to_string(), f[2].parse().unwrap()),
                    (f[3].to_string(), f[4].parse().unwrap()),
                ],
            },
        );
    }
    // The table: each path, then its classes and probabilities.
    let table = stdout(&o);
    let first = &folder[files[0].to_str().unwrap()];
    assert!(
        table.contains(&format!("{}\n", files[0].display())),
        "{table}"
    );
    assert!(
        table.contains(&first.classes[0].0) && table.contains('%'),
        "{table}"
    );

    // --image twice and --list give the folder's predictions for those files, exit status 0.
    let (a, b) = (files[1].to_str().unwrap(), files[n - 1].to_str().unwrap());
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--image",
        a,
        "--image",
        b,
        "--json",
        "--topk",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let two = json_lines(&stdout(&o));
    assert_eq!(
        two.iter().map(|t| t.path.as_str()).collect::<Vec<_>>(),
        [a, b]
    );
    for t in &two {
        same_predictions(t, &folder[&t.path]);
    }
    let list = tmp.path().join("list.txt");
    std::fs::write(&list, format!("# two images\n{a}\n\n{b}\n")).unwrap();
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--list",
        list.to_str().unwrap(),
        "--json",
        "--topk",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&stdout(&o)), two);

    // Test-time flip changes the scores, not the format.
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--image",
        a,
        "--json",
        "--topk",
        "2",
        "--flip",
        "true",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    by_path(&json_lines(&stdout(&o)), 2);

    // Segmentation's --out is refused for a classification checkpoint; nothing to classify is
    // an error.
    let o = run(&[
        "predict",
        "--checkpoint",
        ckpt,
        "--image",
        a,
        "--out",
        tmp.path().join("m.png").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("classification checkpoint"),
        "{}",
        stderr(&o)
    );
    let o = run(&["predict", "--checkpoint", ckpt]);
    assert!(
        !o.status.success() && stderr(&o).contains("--image"),
        "{}",
        stderr(&o)
    );
}
