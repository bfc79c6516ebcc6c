//! Detection data: the COCO, VOC and YOLO readers on one generated scene, their errors, the
//! box-aware flip and crop, and the batch loader's determinism (workers, resume, shards).

mod common;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use tricks::data::{Image, Shard};
use tricks::detect::dataset::{DetDataset, Format, Object, VOC_CLASSES};
use tricks::detect::loader::{eval_loader, train_loader, DetBatch, LoaderOptions, Target};
use tricks::detect::transforms::{
    crop, hflip, random_crop, random_crop_rect, to_tensor, CropOptions,
};

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];
/// The COCO category id of each class: non-contiguous and out of order.
const COCO_IDS: [i64; 3] = [7, 3, 12];
/// The colour each class is drawn in.
const COLOURS: [[u8; 3]; 3] = [[230, 30, 30], [30, 230, 30], [30, 30, 230]];
const BACKGROUND: u8 = 90;

/// One generated object: class index (0-based), box in pixels, crowd (COCO) / difficult (VOC).
#[derive(Clone)]
struct Obj {
    class: usize,
    bbox: [f32; 4],
    crowd: bool,
}

/// One generated image.
#[derive(Clone)]
struct Img {
    stem: String,
    width: u32,
    height: u32,
    grey: bool,
    objects: Vec<Obj>,
}

fn obj(class: usize, bbox: [f32; 4]) -> Obj {
    Obj {
        class,
        bbox,
        crowd: false,
    }
}

/// The scene every format writes: an image with three objects and a crowd, a greyscale one
/// whose box spans its whole width, and one without objects.
fn scene() -> Vec<Img> {
    let mut crowd = obj(1, [40.0, 30.0, 50.0, 44.0]);
    crowd.crowd = true;
    vec![
        Img {
            stem: "a".into(),
            width: 64,
            height: 48,
            grey: false,
            objects: vec![
                obj(0, [4.0, 6.0, 20.0, 30.0]),
                obj(1, [30.0, 10.0, 60.0, 28.0]),
                obj(2, [22.0, 2.0, 28.0, 8.0]),
                crowd,
            ],
        },
        Img {
            stem: "b".into(),
            width: 40,
            height: 40,
            grey: true,
            objects: vec![obj(2, [0.0, 0.0, 40.0, 12.0])],
        },
        Img {
            stem: "c".into(),
            width: 32,
            height: 24,
            grey: false,
            objects: vec![],
        },
    ]
}

/// The picture of `img`: each non-crowd object a rectangle of its class colour (grey level 200
/// for greyscale images) on a flat background.
fn picture(img: &Img) -> image::DynamicImage {
    let colour_at = |x: u32, y: u32| -> Option<[u8; 3]> {
        let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
        img.objects
            .iter()
            .filter(|o| !o.crowd)
            .find(|o| o.bbox[0] < px && px < o.bbox[2] && o.bbox[1] < py && py < o.bbox[3])
            .map(|o| COLOURS[o.class])
    };
    if img.grey {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(img.width, img.height, |x, y| {
            image::Luma([colour_at(x, y).map_or(BACKGROUND, |_| 200)])
        }))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(img.width, img.height, |x, y| {
            image::Rgb(colour_at(x, y).unwrap_or([BACKGROUND; 3]))
        }))
    }
}

/// COCO: images listed in reverse order (ids 10, 20, …), `area` given for the first object only.
fn coco_json(images: &[Img]) -> serde_json::Value {
    let mut ims = Vec::new();
    let mut anns = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let id = 10 * (i as i64 + 1);
        ims.push(json!({"id": id, "file_name": format!("{}.png", img.stem),
                        "width": img.width, "height": img.height}));
        for o in &img.objects {
            let [x1, y1, x2, y2] = o.bbox;
            let mut a = json!({"id": 100 + anns.len(), "image_id": id,
                               "category_id": COCO_IDS[o.class],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": o.crowd as i32});
            if anns.is_empty() {
                a["area"] = json!(123.5);
            }
            anns.push(a);
        }
    }
    ims.reverse();
    let cats: Vec<_> = CLASSES
        .iter()
        .zip(COCO_IDS)
        .map(|(n, id)| json!({"id": id, "name": n, "supercategory": "animal"}))
        .collect();
    json!({"images": ims, "annotations": anns, "categories": cats})
}

/// Writes a COCO dataset; `own_layout` puts the images in `root/<split>/` instead of
/// `root/images/<split>/`.
fn write_coco(root: &Path, split: &str, images: &[Img], own_layout: bool) {
    let dir = if own_layout {
        root.join(split)
    } else {
        root.join("images").join(split)
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    for img in images {
        picture(img)
            .save(dir.join(format!("{}.png", img.stem)))
            .unwrap();
    }
    write_json(&coco_path(root, split), &coco_json(images));
}

fn coco_path(root: &Path, split: &str) -> std::path::PathBuf {
    root.join("annotations")
        .join(format!("instances_{split}.json"))
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// Writes a VOC dataset (1-based inclusive boxes, crowd objects as `difficult`) with a
/// `classes.txt`.
fn write_voc(root: &Path, split: &str, images: &[Img]) {
    for d in ["ImageSets/Main", "Annotations", "JPEGImages"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let mut list = String::new();
    for img in images {
        list += &format!("{}\n", img.stem);
        picture(img)
            .into_rgb8()
            .save(root.join("JPEGImages").join(format!("{}.jpg", img.stem)))
            .unwrap();
        let mut xml = format!(
            "<annotation>\n  <filename>{}.jpg</filename>\n  <size><width>{}</width><height>{}</height><depth>3</depth></size>\n",
            img.stem, img.width, img.height
        );
        for o in &img.objects {
            let [x1, y1, x2, y2] = o.bbox;
            xml += &format!(
                "  <object>\n    <name>{}</name>\n    <pose>Unspecified</pose>\n    <difficult>{}</difficult>\n    \
                 <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox>\n  </object>\n",
                CLASSES[o.class],
                o.crowd as i32,
                x1 + 1.0,
                y1 + 1.0,
                x2,
                y2
            );
        }
        xml += "</annotation>\n";
        std::fs::write(
            root.join("Annotations").join(format!("{}.xml", img.stem)),
            xml,
        )
        .unwrap();
    }
    std::fs::write(root.join(format!("ImageSets/Main/{split}.txt")), list).unwrap();
    std::fs::write(root.join("classes.txt"), CLASSES.join("\n") + "\n").unwrap();
}

/// How a YOLO dataset names its classes.
enum YoloNames {
    YamlList,
    YamlMap,
}

/// Writes a YOLO dataset (crowd objects left out: the format has none; an image without objects
/// gets no label file).
fn write_yolo(root: &Path, split: &str, images: &[Img], names: YoloNames) {
    std::fs::create_dir_all(root.join("images").join(split)).unwrap();
    std::fs::create_dir_all(root.join("labels").join(split)).unwrap();
    for img in images {
        picture(img)
            .save(
                root.join("images")
                    .join(split)
                    .join(format!("{}.png", img.stem)),
            )
            .unwrap();
        let (w, h) = (img.width as f32, img.height as f32);
        let lines: Vec<String> = img
            .objects
            .iter()
            .filter(|o| !o.crowd)
            .map(|o| {
                let [x1, y1, x2, y2] = o.bbox;
                format!(
                    "{} {:.6} {:.6} {:.6} {:.6}",
                    o.class,
                    (x1 + x2) / 2.0 / w,
                    (y1 + y2) / 2.0 / h,
                    (x2 - x1) / w,
                    (y2 - y1) / h
                )
            })
            .collect();
        if !lines.is_empty() {
            std::fs::write(
                root.join("labels")
                    .join(split)
                    .join(format!("{}.txt", img.stem)),
                lines.join("\n") + "\n",
            )
            .unwrap();
        }
    }
    let yaml = match names {
        YoloNames::YamlList => format!(
            "path: .\ntrain: images/train\nval: images/val\nnc: 3\nnames: [{}]\n",
            CLASSES.join(", ")
        ),
        YoloNames::YamlMap => {
            let mut s = "path: .\nnames:\n".to_string();
            for (i, c) in CLASSES.iter().enumerate() {
                s += &format!("  {i}: {c}\n");
            }
            s
        }
    };
    std::fs::write(root.join("data.yaml"), yaml).unwrap();
}

/// Asserts `objects` are the expected objects (1-based labels, boxes within `tol` pixels).
fn assert_objects(objects: &[Object], expected: &[Obj], tol: f32, what: &str) {
    assert_eq!(objects.len(), expected.len(), "{what}: {objects:?}");
    for (o, e) in objects.iter().zip(expected) {
        assert_eq!(o.label, e.class as i64 + 1, "{what}: {o:?}");
        assert_eq!(o.iscrowd, e.crowd, "{what}: {o:?}");
        for k in 0..4 {
            assert!(
                (o.bbox[k] - e.bbox[k]).abs() <= tol,
                "{what}: box {:?} vs {:?}",
                o.bbox,
                e.bbox
            );
        }
    }
}

#[test]
fn the_three_formats_read_the_same_scene() {
    let tmp = tempfile::tempdir().unwrap();
    let images = scene();
    let (coco, voc, yolo, yolo_map) = (
        tmp.path().join("coco"),
        tmp.path().join("voc"),
        tmp.path().join("yolo"),
        tmp.path().join("yolo_map"),
    );
    write_coco(&coco, "train", &images, false);
    write_coco(&coco, "val2017", &images, true);
    write_voc(&voc, "train", &images);
    write_yolo(&yolo, "train", &images, YoloNames::YamlList);
    write_yolo(&yolo_map, "train", &images, YoloNames::YamlMap);

    let datasets = [
        (
            "coco",
            DetDataset::open(Format::Coco, &coco, "train").unwrap(),
        ),
        (
            "coco own layout",
            DetDataset::open(Format::Coco, &coco, "val2017").unwrap(),
        ),
        ("voc", DetDataset::open(Format::Voc, &voc, "train").unwrap()),
        (
            "yolo list",
            DetDataset::open(Format::Yolo, &yolo, "train").unwrap(),
        ),
        (
            "yolo map",
            DetDataset::open(Format::Yolo, &yolo_map, "train").unwrap(),
        ),
    ];
    for (what, ds) in &datasets {
        assert_eq!(ds.classes, CLASSES, "{what}");
        assert_eq!(ds.len(), 3, "{what}");
        assert_eq!(ds.dropped(), 0, "{what}");
        let crowd = what.starts_with("coco") || *what == "voc";
        for (s, img) in ds.samples.iter().zip(&images) {
            assert_eq!(
                s.image.file_stem().unwrap().to_str(),
                Some(img.stem.as_str()),
                "{what}"
            );
            assert_eq!((s.width, s.height), (img.width, img.height), "{what}");
            let expected: Vec<Obj> = img
                .objects
                .iter()
                .filter(|o| crowd || !o.crowd)
                .cloned()
                .collect();
            // YOLO's 6-decimal normalised numbers are within 1e-3 px of the pixel boxes.
            assert_objects(&s.objects, &expected, 1e-3, what);
        }
    }

    // COCO: images in id order whatever the JSON's order, labels 1..=K in the order of
    // `categories`, the original ids kept, `area` from the JSON else the box area.
    let coco_ds = &datasets[0].1;
    assert_eq!(
        coco_ds
            .samples
            .iter()
            .map(|s| s.image_id)
            .collect::<Vec<_>>(),
        [10, 20, 30]
    );
    assert_eq!(coco_ds.category_ids(), COCO_IDS);
    let a = &coco_ds.samples[0].objects;
    assert_eq!(a[0].area, 123.5);
    assert_eq!(a[1].area, 30.0 * 18.0);
    assert!(a[3].iscrowd);
    // VOC and YOLO: image ids are positions, category ids 1..=K.
    for ds in [&datasets[2].1, &datasets[3].1] {
        assert_eq!(
            ds.samples.iter().map(|s| s.image_id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(ds.category_ids(), [1, 2, 3]);
    }
    // VOC: difficult is iscrowd; the box area is the area.
    let voc_a = &datasets[2].1.samples[0].objects;
    assert!(voc_a[3].iscrowd && !voc_a[0].iscrowd);
    assert_eq!(voc_a[0].area, 16.0 * 24.0);

    // The greyscale PNG decodes to RGB; the decoded image is the one the boxes describe.
    let grey = datasets[3].1.load_image(1).unwrap();
    assert_eq!((grey.width, grey.height), (40, 40));
    assert_eq!(grey.pixel(5, 5), [200; 3]);
    assert_eq!(grey.pixel(5, 20), [BACKGROUND; 3]);
    let rgb = datasets[0].1.load_image(0).unwrap();
    assert_eq!(rgb.pixel(10, 10), COLOURS[0]);

    // Without classes.txt, VOC's 20 classes in the standard order.
    std::fs::remove_file(voc.join("classes.txt")).unwrap();
    std::fs::write(
        voc.join("Annotations/c.xml"),
        "<annotation><size><width>32</width><height>24</height></size>\
         <object><name>tvmonitor</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>32</xmax><ymax>24</ymax></bndbox></object>\
         </annotation>",
    )
    .unwrap();
    let voc20 = DetDataset::open(Format::Voc, &voc, "train").unwrap();
    assert_eq!(voc20.classes, VOC_CLASSES);
    let labels: Vec<i64> = voc20.samples[0].objects.iter().map(|o| o.label).collect();
    assert_eq!(labels, [8, 12, 3, 12]); // cat, dog, bird, dog
                                        // 1-based (1, 1, W, H) covers the whole image: (0, 0, W, H).
    assert_eq!(voc20.samples[2].objects[0].bbox, [0.0, 0.0, 32.0, 24.0]);
    assert_eq!(voc20.samples[2].objects[0].label, 20);

    assert_eq!("coco".parse::<Format>().unwrap(), Format::Coco);
    assert_eq!("voc".parse::<Format>().unwrap(), Format::Voc);
    assert_eq!("yolo".parse::<Format>().unwrap(), Format::Yolo);
    let e = "kitti".parse::<Format>().unwrap_err().to_string();
    assert!(
        e.contains("`kitti`") && e.contains("coco, voc or yolo"),
        "{e}"
    );
}

#[test]
fn boxes_within_a_pixel_are_clamped_and_zero_size_boxes_dropped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let img = Img {
        stem: "a".into(),
        width: 64,
        height: 48,
        grey: false,
        objects: vec![
            obj(0, [-0.5, 2.0, 10.0, 48.75]), // out by under a pixel: clamped
            obj(1, [20.0, 5.0, 20.0, 9.0]),   // zero width: dropped
            obj(2, [64.0, 10.0, 64.5, 20.0]), // zero width once clamped: dropped
            obj(1, [30.0, 10.0, 40.0, 20.0]),
        ],
    };
    write_coco(tmp.path(), "train", std::slice::from_ref(&img), false);
    let ds = DetDataset::open(Format::Coco, tmp.path(), "train").unwrap();
    assert_eq!(ds.dropped(), 2);
    let o = &ds.samples[0].objects;
    assert_eq!(o.len(), 2);
    assert_eq!(o[0].bbox, [0.0, 2.0, 10.0, 48.0]);
    assert_eq!(o[1].bbox, [30.0, 10.0, 40.0, 20.0]);
    assert_eq!(o[1].label, 2);
}

/// The error of `r`, with its causes.
fn error<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

/// Asserts `msg` contains every one of `parts`.
fn assert_says(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{p}` not in: {msg}");
    }
}

#[test]
fn coco_annotation_errors_name_the_file_and_the_annotation() {
    let tmp = tempfile::tempdir().unwrap();
    let images = scene();
    let open = |root: &Path| DetDataset::open(Format::Coco, root, "train");
    // Each case: a fresh copy of the scene with one thing wrong.
    let case = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let root = tmp.path().join(name);
        write_coco(&root, "train", &images, false);
        let mut v = coco_json(&images);
        edit(&mut v);
        write_json(&coco_path(&root, "train"), &v);
        root
    };
    let file = "instances_train.json";

    let root = case("outside", &|v| {
        v["annotations"][1]["bbox"] = json!([30, 10, 40, 18])
    });
    assert_says(
        &error(open(&root)),
        &[
            file,
            "annotation id 101",
            "image id 10",
            "outside the 64x48 image",
        ],
    );
    let root = case("category", &|v| {
        v["annotations"][2]["category_id"] = json!(99)
    });
    assert_says(
        &error(open(&root)),
        &[file, "annotation id 102", "unknown category id 99"],
    );
    let root = case("negative", &|v| {
        v["annotations"][0]["bbox"] = json!([4, 6, -3, 24])
    });
    assert_says(
        &error(open(&root)),
        &[file, "annotation id 100", "negative size"],
    );
    let root = case("image id", &|v| v["annotations"][4]["image_id"] = json!(77));
    assert_says(
        &error(open(&root)),
        &[file, "annotation id 104", "unknown image id 77"],
    );
    let root = case("bbox type", &|v| {
        v["annotations"][3]["bbox"] = json!("wide")
    });
    assert_says(
        &error(open(&root)),
        &[file, "malformed", "annotations[3].bbox"],
    );

    let root = case("missing image", &|_| {});
    std::fs::remove_file(root.join("images/train/b.png")).unwrap();
    assert_says(
        &error(open(&root)),
        &[file, "image id 20", "missing image file", "b.png"],
    );

    let root = case("truncated", &|_| {});
    let text = std::fs::read_to_string(coco_path(&root, "train")).unwrap();
    std::fs::write(coco_path(&root, "train"), &text[..text.len() / 2]).unwrap();
    assert_says(
        &error(open(&root)),
        &[file, "malformed COCO annotation file", "line"],
    );

    let root = case("no json", &|_| {});
    std::fs::remove_file(coco_path(&root, "train")).unwrap();
    assert_says(
        &error(open(&root)),
        &[file, "cannot read COCO annotation file"],
    );

    // The JSON's size is trusted when reading and checked when the image is decoded.
    let root = case("size", &|v| v["images"][2]["width"] = json!(65)); // a.png, listed last
    let ds = open(&root).unwrap();
    assert_says(
        &error(ds.load_image(0)),
        &["a.png", "is 64x48", "says 65x48"],
    );
}

#[test]
fn voc_annotation_errors_name_the_file_and_the_object() {
    let tmp = tempfile::tempdir().unwrap();
    let images = scene();
    let open = |root: &Path| DetDataset::open(Format::Voc, root, "train");
    let case = |name: &str, from: &str, to: &str| {
        let root = tmp.path().join(name);
        write_voc(&root, "train", &images);
        let xml = root.join("Annotations/a.xml");
        let text = std::fs::read_to_string(&xml).unwrap();
        assert!(text.contains(from), "{from} not in {text}");
        std::fs::write(&xml, text.replacen(from, to, 1)).unwrap();
        root
    };

    let root = case("outside", "<xmax>60</xmax>", "<xmax>70</xmax>");
    assert_says(
        &error(open(&root)),
        &["a.xml", "object 1", "dog", "outside the 64x48 image"],
    );
    let root = case("class", "<name>bird</name>", "<name>zebra</name>");
    assert_says(
        &error(open(&root)),
        &[
            "a.xml",
            "object 2",
            "unknown class `zebra`",
            "cat, dog, bird",
        ],
    );
    let root = case("negative", "<xmin>31</xmin>", "<xmin>62</xmin>");
    assert_says(&error(open(&root)), &["a.xml", "object 1", "negative size"]);
    let root = case("number", "<ymax>30</ymax>", "<ymax>3O</ymax>");
    assert_says(
        &error(open(&root)),
        &["a.xml", "object 0", "<ymax> is `3O`, not a number"],
    );
    let root = case("malformed", "</annotation>", "</annotatio>");
    assert_says(
        &error(open(&root)),
        &["a.xml", "malformed VOC annotation file"],
    );

    let root = case("missing image", "", "");
    std::fs::remove_file(root.join("JPEGImages/b.jpg")).unwrap();
    assert_says(
        &error(open(&root)),
        &["train.txt line 2", "missing image file", "b.jpg"],
    );
    let root = case("missing xml", "", "");
    std::fs::remove_file(root.join("Annotations/c.xml")).unwrap();
    assert_says(
        &error(open(&root)),
        &["c.xml", "cannot read VOC annotation file"],
    );
}

#[test]
fn yolo_label_errors_name_the_file_and_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let images = scene();
    let open = |root: &Path| DetDataset::open(Format::Yolo, root, "train");
    // a.txt with `line` as its second line.
    let case = |name: &str, line: &str| {
        let root = tmp.path().join(name);
        write_yolo(&root, "train", &images, YoloNames::YamlList);
        let txt = root.join("labels/train/a.txt");
        std::fs::write(&txt, format!("0 0.2 0.3 0.1 0.1\n{line}\n")).unwrap();
        root
    };

    let root = case("outside", "1 1.2 0.5 0.2 0.2");
    assert_says(
        &error(open(&root)),
        &["a.txt line 2", "outside the 64x48 image"],
    );
    let root = case("class", "5 0.5 0.5 0.1 0.1");
    assert_says(
        &error(open(&root)),
        &["a.txt line 2", "unknown class 5", "3 classes"],
    );
    let root = case("fields", "1 0.5 0.5 0.1");
    assert_says(
        &error(open(&root)),
        &["a.txt line 2", "expected 5 fields", "found 4"],
    );
    let root = case("segment", "1 0.1 0.1 0.5 0.1 0.5 0.5");
    assert_says(
        &error(open(&root)),
        &["a.txt line 2", "expected 5 fields", "found 7"],
    );
    let root = case("number", "1 0.5 abc 0.1 0.1");
    assert_says(
        &error(open(&root)),
        &["a.txt line 2", "`abc` is not a number"],
    );
    let root = case("class index", "1.5 0.5 0.5 0.1 0.1");
    assert_says(
        &error(open(&root)),
        &["a.txt line 2", "class `1.5` is not a class index"],
    );
    let root = case("negative", "1 0.5 0.5 -0.1 0.1");
    assert_says(&error(open(&root)), &["a.txt line 2", "negative size"]);

    let root = case("no names", "");
    std::fs::remove_file(root.join("data.yaml")).unwrap();
    assert_says(
        &error(open(&root)),
        &["no class names", "data.yaml", "classes.txt"],
    );
    // classes.txt is the fallback.
    std::fs::write(root.join("classes.txt"), "cat\ndog\nbird\n").unwrap();
    assert_eq!(open(&root).unwrap().classes, CLASSES);
    let root = case("gap", "");
    std::fs::write(root.join("data.yaml"), "names:\n  0: cat\n  2: dog\n").unwrap();
    assert_says(
        &error(open(&root)),
        &["data.yaml", "class index 1 is missing"],
    );
    let root = case("yaml", "");
    std::fs::write(root.join("data.yaml"), "names: 3\n").unwrap();
    assert_says(&error(open(&root)), &["malformed", "data.yaml", "names"]);
}

#[test]
fn coco_boxes_and_categories_match_pycocotools() {
    let python = common::python();
    if !python.exists() {
        common::skip_reference("pycocotools COCO boxes", "no Python interpreter");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut images = scene();
    // A zero-size box and boxes out by less than a pixel, which both sides clamp or drop.
    images[0].objects.push(obj(0, [10.0, 40.0, 10.0, 44.0]));
    images[2].objects.push(obj(2, [-0.75, 3.0, 12.0, 24.5]));
    images[2].objects.push(obj(1, [32.0, 0.0, 32.5, 4.0]));
    write_coco(tmp.path(), "train", &images, false);
    let ds = DetDataset::open(Format::Coco, tmp.path(), "train").unwrap();
    // torchvision's references/detection/coco_utils.py (ConvertCocoPolysToMask) on the
    // annotations as pycocotools reads them: crowds out, xywh → xyxy, clamped, empty boxes out.
    let script = r#"
import json, sys
from pycocotools.coco import COCO
coco = COCO(sys.argv[1])
out = []
for img_id in sorted(coco.imgs):
    im = coco.imgs[img_id]
    w, h = im["width"], im["height"]
    boxes = []
    for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
        if a["iscrowd"]:
            continue
        x, y, bw, bh = a["bbox"]
        b = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
        if b[2] > b[0] and b[3] > b[1]:
            boxes.append(b + [a["category_id"]])
    out.append({"id": img_id, "boxes": boxes})
print(json.dumps(out))
"#;
    let out = match std::process::Command::new(&python)
        .args(["-c", script])
        .arg(coco_path(tmp.path(), "train"))
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).to_string();
            common::skip_reference("pycocotools COCO boxes", &why);
            return;
        }
        Err(e) => {
            common::skip_reference("pycocotools COCO boxes", &e.to_string());
            return;
        }
    };
    let reference: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let reference = reference.as_array().unwrap();
    assert_eq!(reference.len(), ds.len());
    assert_eq!(ds.dropped(), 2);
    for (s, r) in ds.samples.iter().zip(reference) {
        assert_eq!(s.image_id, r["id"].as_i64().unwrap());
        let target = Target::from_objects(&s.objects);
        let boxes = Vec::<f32>::try_from(target.boxes.flatten(0, -1)).unwrap();
        let labels = Vec::<i64>::try_from(&target.labels).unwrap();
        let expected = r["boxes"].as_array().unwrap();
        assert_eq!(labels.len(), expected.len(), "image {}", s.image_id);
        for (k, e) in expected.iter().enumerate() {
            let e: Vec<f64> = e
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(
                &boxes[4 * k..4 * k + 4],
                &[e[0] as f32, e[1] as f32, e[2] as f32, e[3] as f32]
            );
            assert_eq!(ds.category_ids()[labels[k] as usize - 1], e[4] as i64);
        }
    }
}

/// A `w` x `h` image of background grey with one filled rectangle per object (its class colour)
/// and those objects.
fn drawn(w: u32, h: u32, boxes: &[(usize, [u32; 4])]) -> (Image, Vec<Object>) {
    let mut img = Image::from_rgb(w, h, vec![BACKGROUND; (w * h * 3) as usize]);
    let mut objects = Vec::new();
    for &(class, [x1, y1, x2, y2]) in boxes {
        for y in y1..y2 {
            for x in x1..x2 {
                let i = ((y * w + x) * 3) as usize;
                img.rgb[i..i + 3].copy_from_slice(&COLOURS[class]);
            }
        }
        let bbox = [x1 as f32, y1 as f32, x2 as f32, y2 as f32];
        objects.push(Object {
            bbox,
            label: class as i64 + 1,
            iscrowd: false,
            area: ((x2 - x1) * (y2 - y1)) as f32,
        });
    }
    (img, objects)
}

/// Asserts every pixel of every object's box has the object's colour and, with `all_drawn`, that
/// every pixel of a class colour lies in a box of that class (not so after a crop, which drops
/// the objects centred outside it but keeps their pixels).
fn assert_boxes_cover_their_pixels(img: &Image, objects: &[Object], all_drawn: bool, what: &str) {
    for o in objects {
        let [x1, y1, x2, y2] = o.bbox;
        assert!(x1 >= 0.0 && y1 >= 0.0 && x2 <= img.width as f32 && y2 <= img.height as f32);
        for y in y1 as u32..y2 as u32 {
            for x in x1 as u32..x2 as u32 {
                assert_eq!(
                    img.pixel(x, y),
                    COLOURS[o.label as usize - 1],
                    "{what}: ({x}, {y}) of {o:?}"
                );
            }
        }
    }
    if !all_drawn {
        return;
    }
    for y in 0..img.height {
        for x in 0..img.width {
            let p = img.pixel(x, y);
            if let Some(c) = COLOURS.iter().position(|&c| c == p) {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                assert!(
                    objects.iter().any(|o| o.label == c as i64 + 1
                        && o.bbox[0] < px
                        && px < o.bbox[2]
                        && o.bbox[1] < py
                        && py < o.bbox[3]),
                    "{what}: a class-{c} pixel at ({x}, {y}) in no box of that class"
                );
            }
        }
    }
}

#[test]
fn a_flipped_image_has_the_flipped_boxes() {
    let (mut img, mut objects) = drawn(40, 30, &[(0, [5, 8, 15, 20]), (2, [30, 0, 40, 3])]);
    assert_boxes_cover_their_pixels(&img, &objects, true, "before");
    hflip(&mut img, &mut objects);
    assert_eq!(objects[0].bbox, [25.0, 8.0, 35.0, 20.0]);
    assert_eq!(objects[1].bbox, [0.0, 0.0, 10.0, 3.0]);
    assert_boxes_cover_their_pixels(&img, &objects, true, "flipped");
}

#[test]
fn a_crop_keeps_the_boxes_centred_in_it_with_their_pixels() {
    let (img, objects) = drawn(
        80,
        60,
        &[
            (0, [2, 3, 30, 25]),
            (1, [40, 10, 70, 30]),
            (2, [20, 40, 50, 58]),
        ],
    );
    let opts = CropOptions::default();
    let mut cropped = 0;
    for seed in 0..40 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rect = random_crop_rect(img.width, img.height, &objects, &opts, &mut rng);
        let Some(rect) = rect else { continue };
        cropped += 1;
        assert!(rect.x + rect.width <= 80 && rect.y + rect.height <= 60);
        assert!(rect.width >= 24 && rect.height >= 18, "{rect:?}");
        let aspect = rect.width as f64 / rect.height as f64;
        assert!((0.5..=2.0).contains(&aspect), "{rect:?}");
        let (out, kept) = crop(&img, &objects, rect);
        assert_eq!((out.width, out.height), (rect.width, rect.height));
        // Kept: exactly the objects whose centre lies strictly inside the crop.
        let inside: Vec<i64> = objects
            .iter()
            .filter(|o| {
                let (cx, cy) = ((o.bbox[0] + o.bbox[2]) / 2.0, (o.bbox[1] + o.bbox[3]) / 2.0);
                (rect.x as f32) < cx
                    && cx < (rect.x + rect.width) as f32
                    && (rect.y as f32) < cy
                    && cy < (rect.y + rect.height) as f32
            })
            .map(|o| o.label)
            .collect();
        assert!(!inside.is_empty());
        assert_eq!(kept.iter().map(|o| o.label).collect::<Vec<_>>(), inside);
        // Every kept box is inside the crop and its pixels moved with it.
        for o in &kept {
            let [x1, y1, x2, y2] = o.bbox;
            assert!(0.0 <= x1 && x1 < x2 && x2 <= out.width as f32, "{o:?}");
            assert!(0.0 <= y1 && y1 < y2 && y2 <= out.height as f32, "{o:?}");
            let original = objects.iter().find(|p| p.label == o.label).unwrap();
            assert!((o.area - o.box_area() / original.box_area() * original.area).abs() < 1e-3);
            for y in y1 as u32..y2 as u32 {
                for x in x1 as u32..x2 as u32 {
                    assert_eq!(out.pixel(x, y), COLOURS[o.label as usize - 1]);
                }
            }
        }
    }
    assert!(cropped > 30, "only {cropped} of 40 crops drawn");

    // No box to keep: no crop. The same draws give the same crop.
    let mut crowd_only = objects.clone();
    crowd_only.iter_mut().for_each(|o| o.iscrowd = true);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert_eq!(random_crop_rect(80, 60, &crowd_only, &opts, &mut rng), None);
    let (a, ka) = random_crop(
        img.clone(),
        objects.clone(),
        &opts,
        &mut ChaCha8Rng::seed_from_u64(5),
    );
    let (b, kb) = random_crop(
        img.clone(),
        objects.clone(),
        &opts,
        &mut ChaCha8Rng::seed_from_u64(5),
    );
    assert_eq!((a.rgb, ka), (b.rgb, kb));
}

#[test]
fn to_tensor_is_chw_bytes_over_255() {
    let img = Image::from_rgb(2, 1, vec![0, 128, 255, 10, 20, 30]);
    let t = to_tensor(&img);
    assert_eq!(t.size(), [3, 1, 2]);
    assert_eq!(t.kind(), tch::Kind::Float);
    let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
    let expected: Vec<f32> = [0u8, 10, 128, 20, 255, 30]
        .iter()
        .map(|&b| b as f32 / 255.0)
        .collect();
    assert_eq!(v, expected);
}

/// A COCO dataset of `n` images of assorted sizes, each with one to three non-overlapping
/// objects drawn in their class colours, every third image with a crowd too.
fn loader_dataset(root: &Path, n: usize) -> Arc<DetDataset> {
    let images: Vec<Img> = (0..n)
        .map(|i| {
            let (w, h) = (40 + 4 * (i as u32 % 4), 32 + 6 * (i as u32 % 3));
            let mut objects = vec![obj(i % 3, [2.0, 2.0, 14.0, 12.0])];
            if i % 2 == 0 {
                objects.push(obj((i + 1) % 3, [20.0, 4.0, 36.0, 20.0]));
            }
            if i % 3 == 0 {
                objects.push(obj((i + 2) % 3, [4.0, 22.0, 30.0, 30.0]));
                let mut crowd = obj(0, [30.0, 22.0, 38.0, 30.0]);
                crowd.crowd = true;
                objects.push(crowd);
            }
            Img {
                stem: format!("{i:02}"),
                width: w,
                height: h,
                grey: false,
                objects,
            }
        })
        .collect();
    write_coco(root, "train", &images, false);
    Arc::new(DetDataset::open(Format::Coco, root, "train").unwrap())
}

fn options(batch_size: usize, workers: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        workers,
        hflip_prob: 0.5,
        min_sizes: vec![16, 20, 24],
        crop: Some(CropOptions::default()),
    }
}

fn collect(loader: impl Iterator<Item = anyhow::Result<DetBatch>>) -> Vec<DetBatch> {
    loader.map(|b| b.unwrap()).collect()
}

fn same_sample(a: &DetBatch, i: usize, b: &DetBatch, j: usize) -> bool {
    a.indices[i] == b.indices[j]
        && a.min_sizes[i] == b.min_sizes[j]
        && a.images[i].size() == b.images[j].size()
        && a.images[i].equal(&b.images[j])
        && a.targets[i].boxes.equal(&b.targets[j].boxes)
        && a.targets[i].labels.equal(&b.targets[j].labels)
}

fn same_batches(a: &[DetBatch], b: &[DetBatch]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.len() == y.len() && (0..x.len()).all(|i| same_sample(x, i, y, i)))
}

/// The image tensor `[3, H, W]` back to an `Image`.
fn to_image(t: &tch::Tensor) -> Image {
    let (h, w) = (t.size()[1], t.size()[2]);
    let hwc = (t.permute([1, 2, 0]) * 255.0)
        .round()
        .to_kind(tch::Kind::Uint8);
    let bytes = Vec::<u8>::try_from(hwc.flatten(0, -1)).unwrap();
    Image::from_rgb(w as u32, h as u32, bytes)
}

#[test]
fn the_training_loader_is_deterministic_resumable_and_shards_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = loader_dataset(tmp.path(), 10);
    let full = collect(train_loader(
        ds.clone(),
        &options(2, 1),
        7,
        3,
        0,
        Shard::SINGLE,
    ));
    assert_eq!(full.len(), 5);

    // Two decoding threads: the same batches.
    let two = collect(train_loader(
        ds.clone(),
        &options(2, 2),
        7,
        3,
        0,
        Shard::SINGLE,
    ));
    assert!(same_batches(&full, &two));
    // Resumed at batch 3: the tail of the full epoch.
    let tail = collect(train_loader(
        ds.clone(),
        &options(2, 2),
        7,
        3,
        3,
        Shard::SINGLE,
    ));
    assert!(same_batches(&full[3..], &tail));
    // Another epoch, another order.
    let other = collect(train_loader(
        ds.clone(),
        &options(2, 1),
        7,
        4,
        0,
        Shard::SINGLE,
    ));
    let order = |bs: &[DetBatch]| {
        bs.iter()
            .flat_map(|b| b.indices.clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(order(&full), order(&other));
    let mut seen = order(&full);
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());

    // Two ranks of batch 2 take the halves of the single process's batches of 4 (drop_last:
    // 10 images make 2 global batches), augmented alike.
    let global = collect(train_loader(
        ds.clone(),
        &options(4, 1),
        7,
        3,
        0,
        Shard::SINGLE,
    ));
    assert_eq!(global.len(), 2);
    for rank in 0..2 {
        let shard = Shard { rank, world: 2 };
        let mine = collect(train_loader(ds.clone(), &options(2, 1), 7, 3, 0, shard));
        assert_eq!(mine.len(), 2);
        for (s, b) in mine.iter().enumerate() {
            assert_eq!(b.len(), 2);
            for i in 0..2 {
                assert!(
                    same_sample(b, i, &global[s], 2 * rank + i),
                    "rank {rank} batch {s}"
                );
            }
        }
    }

    // The augmentation keeps every box on its object's pixels, leaves crowds out, and varies
    // the crop, flip and scale.
    let mut cropped = 0;
    let mut sizes = std::collections::BTreeSet::new();
    for b in &full {
        for i in 0..b.len() {
            let img = to_image(&b.images[i]);
            let sample = &ds.samples[b.indices[i]];
            if (img.width, img.height) != (sample.width, sample.height) {
                cropped += 1;
            }
            sizes.insert(b.min_sizes[i]);
            let t = &b.targets[i];
            let boxes = Vec::<f32>::try_from(t.boxes.flatten(0, -1)).unwrap();
            let labels = Vec::<i64>::try_from(&t.labels).unwrap();
            let objects: Vec<Object> = labels
                .iter()
                .enumerate()
                .map(|(k, &label)| Object {
                    bbox: boxes[4 * k..4 * k + 4].try_into().unwrap(),
                    label,
                    iscrowd: false,
                    area: 0.0,
                })
                .collect();
            assert!(!objects.is_empty());
            assert_boxes_cover_their_pixels(&img, &objects, false, "loader");
        }
    }
    assert!(cropped > 0);
    assert!(
        sizes.len() > 1 && sizes.iter().all(|s| [16, 20, 24].contains(s)),
        "{sizes:?}"
    );
}

#[test]
fn the_evaluation_loader_keeps_order_images_and_the_last_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = loader_dataset(tmp.path(), 7);
    let batches = collect(eval_loader(ds.clone(), &options(3, 2), Shard::SINGLE));
    assert_eq!(
        batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        [3, 3, 1]
    );
    let indices: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(indices, (0..7).collect::<Vec<_>>());
    for b in &batches {
        assert!(b.min_sizes.iter().all(|&s| s == 24));
        for (i, &k) in b.indices.iter().enumerate() {
            assert!(b.images[i].equal(&to_tensor(&ds.load_image(k).unwrap())));
            let expected: Vec<i64> = ds.samples[k]
                .objects
                .iter()
                .filter(|o| !o.iscrowd)
                .map(|o| o.label)
                .collect();
            assert_eq!(
                Vec::<i64>::try_from(&b.targets[i].labels).unwrap(),
                expected
            );
            assert_eq!(b.targets[i].boxes.size(), [expected.len() as i64, 4]);
        }
    }
    // Two ranks: every other image each, together each image once.
    let rank1 = collect(eval_loader(
        ds.clone(),
        &options(3, 1),
        Shard { rank: 1, world: 2 },
    ));
    let idx: Vec<usize> = rank1.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, [1, 3, 5]);

    // A bad image is an error naming the file; bad options are an error naming the option.
    std::fs::write(tmp.path().join("images/train/04.png"), b"not an image").unwrap();
    let mut pass = eval_loader(ds.clone(), &options(3, 1), Shard::SINGLE);
    assert!(pass.next().unwrap().is_ok());
    assert_says(
        &error(pass.next().unwrap()),
        &["04.png", "not a JPEG or PNG image", "sample 4"],
    );
    let mut bad = options(3, 1);
    bad.hflip_prob = 1.5;
    let mut pass = train_loader(ds.clone(), &bad, 1, 0, 0, Shard::SINGLE);
    assert_says(&error(pass.next().unwrap()), &["hflip_prob 1.5"]);
    assert!(pass.next().is_none());
    bad.hflip_prob = 0.5;
    bad.min_sizes.clear();
    assert_says(
        &error(eval_loader(ds, &bad, Shard::SINGLE).next().unwrap()),
        &["min_sizes"],
    );
}
