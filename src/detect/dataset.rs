//! Detection datasets: COCO JSON, Pascal VOC XML and Ultralytics YOLO txt annotations, read into
//! one in-memory form ([`DetDataset`]: a list of [`DetSample`]s, each an image file and its
//! [`Object`]s, boxes in pixels as `x1, y1, x2, y2`).
//!
//! Layouts ([`DetDataset::open`]):
//! * COCO: `root/annotations/instances_<split>.json`, images in `root/images/<split>/` or
//!   `root/<split>/` (COCO's own layout, e.g. `train2017/`), `file_name` relative to that folder.
//!   Images in the order of their ids (as torchvision's `CocoDetection`), `image_id` the COCO id.
//!   Category ids may be non-contiguous: they become labels 1..=K in the order of the
//!   `categories` array, and [`DetDataset::category_ids`] keeps the original ids for results.
//!   The JSON's `width` / `height` are trusted here and checked when the image is decoded.
//! * VOC: `root/ImageSets/Main/<split>.txt` (one image id a line), `root/Annotations/<id>.xml`,
//!   `root/JPEGImages/<id>.jpg`. Classes: the 20 VOC classes in the standard order, or
//!   `root/classes.txt` (one name a line) when there is one. VOC boxes are 1-based inclusive
//!   pixel indices; they become `(xmin − 1, ymin − 1, xmax, ymax)`, the continuous box that
//!   covers those pixels (detectron2's `pascal_voc.py` conversion; GluonCV subtracts 1 from all
//!   four, torchvision's `VOCDetection` leaves the XML as is). `difficult = 1` objects become
//!   `iscrowd = true`: the trainer drops them from the targets and COCO-style evaluation ignores
//!   detections matched to them, as the VOC protocol ignores difficult objects.
//! * YOLO (Ultralytics): `root/images/<split>/**/*.jpg|png`, each with
//!   `root/labels/<split>/<same relative path>.txt` (lines `class cx cy w h`, normalised to the
//!   image size, class 0-based; a missing label file is an image without objects). Class names
//!   from `root/data.yaml` (`names:` as a list or as a `{0: name}` map) or `root/classes.txt`.
//!   The image size is read from the file header (no decode) to turn the boxes into pixels.
//!
//! VOC and YOLO images get `image_id` = their position in the split.
//!
//! Checks, as COCO and torchvision's references treat boxes: a box may stick out of its image by
//! up to [`BOX_TOLERANCE`] (rounding) and is then clamped to it; a box further out, a box of
//! negative size (`x2 < x1`), an unknown class or category id, a missing image and a missing or
//! malformed annotation file are errors naming the file and the line (YOLO), the object index
//! (VOC) or the annotation id (COCO). A box of zero width or height after clamping is dropped
//! (COCO's loaders do the same), counted in [`DetDataset::dropped`]. Crowd objects are kept with
//! `iscrowd = true`.

use crate::config::DataFormat;
use crate::data::imagefolder::{list_images, load_image};
use crate::data::Image;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How far (pixels) a box may lie outside its image before it is an error rather than rounding.
pub const BOX_TOLERANCE: f32 = 1.0;

/// The 20 Pascal VOC classes in the standard order (label k is `VOC_CLASSES[k - 1]`).
pub const VOC_CLASSES: [&str; 20] = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// The annotation formats [`DetDataset::open`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Coco,
    Voc,
    Yolo,
}

impl Format {
    /// The name the format is written with in configs: "coco", "voc" or "yolo".
    pub fn name(self) -> &'static str {
        match self {
            Format::Coco => "coco",
            Format::Voc => "voc",
            Format::Yolo => "yolo",
        }
    }
}

impl Format {
    /// The format of `data.format`; "auto" tells the three apart by their files in `root`:
    /// `annotations/` (COCO), `Annotations/` (VOC) or `labels/` (YOLO).
    pub fn of(format: DataFormat, root: &Path) -> Result<Format> {
        Ok(match format {
            DataFormat::Coco => Format::Coco,
            DataFormat::Voc => Format::Voc,
            DataFormat::Yolo => Format::Yolo,
            DataFormat::Auto if root.join("annotations").is_dir() => Format::Coco,
            DataFormat::Auto if root.join("Annotations").is_dir() => Format::Voc,
            DataFormat::Auto if root.join("labels").is_dir() => Format::Yolo,
            DataFormat::Auto => bail!(
                "{}: no annotations/ (COCO), Annotations/ (VOC) or labels/ (YOLO) folder; set \
                 `data.format` or check `data.dir`",
                root.display()
            ),
            other => {
                bail!("key `data.format`: {other:?} is not a detection format (coco, voc or yolo)")
            }
        })
    }
}

impl FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Format> {
        match s {
            "coco" => Ok(Format::Coco),
            "voc" => Ok(Format::Voc),
            "yolo" => Ok(Format::Yolo),
            other => bail!("unknown detection data format `{other}` (expected coco, voc or yolo)"),
        }
    }
}

/// One annotated object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    /// `x1, y1, x2, y2` in pixels, inside the image, positive width and height.
    pub bbox: [f32; 4],
    /// 1..=K (0 is the background).
    pub label: i64,
    /// A crowd region (COCO) or a difficult object (VOC): not a training target, ignored by the
    /// evaluation.
    pub iscrowd: bool,
    /// COCO's `area` field (of the segmentation), else the box area; evaluation sorts objects
    /// into small / medium / large by it.
    pub area: f32,
}

impl Object {
    /// The area of the box, `(x2 − x1) · (y2 − y1)`.
    pub fn box_area(&self) -> f32 {
        let [x1, y1, x2, y2] = self.bbox;
        (x2 - x1) * (y2 - y1)
    }
}

/// One image and its objects.
#[derive(Clone, Debug, PartialEq)]
pub struct DetSample {
    pub image: PathBuf,
    /// COCO's image id; the position in the split for VOC and YOLO.
    pub image_id: i64,
    pub width: u32,
    pub height: u32,
    pub objects: Vec<Object>,
}

/// One split of a detection dataset, in memory (the annotations; images are decoded on demand).
#[derive(Clone, Debug)]
pub struct DetDataset {
    pub samples: Vec<DetSample>,
    /// `classes[k - 1]` is the name of label k.
    pub classes: Vec<String>,
    /// `category_ids[k - 1]` is the original category id of label k.
    category_ids: Vec<i64>,
    /// Boxes of zero width or height (after clamping to the image) left out of `samples`.
    dropped: usize,
}

impl DetDataset {
    /// Reads split `split` of the dataset at `root` in `format` (see the module doc for the
    /// layouts and checks).
    pub fn open(format: Format, root: &Path, split: &str) -> Result<DetDataset> {
        if !root.is_dir() {
            bail!(
                "detection dataset folder {} does not exist or is not a folder",
                root.display()
            );
        }
        let ds = match format {
            Format::Coco => open_coco(root, split),
            Format::Voc => open_voc(root, split),
            Format::Yolo => open_yolo(root, split),
        }
        .with_context(|| {
            format!(
                "cannot open the {split} split of the {} dataset {}",
                format.name(),
                root.display()
            )
        })?;
        Ok(ds)
    }

    /// A dataset of formats without category ids of their own (VOC, YOLO): label k is
    /// `classes[k - 1]`, its original id k.
    fn numbered(samples: Vec<DetSample>, classes: Vec<String>, dropped: usize) -> DetDataset {
        DetDataset {
            category_ids: (1..=classes.len() as i64).collect(),
            samples,
            classes,
            dropped,
        }
    }

    /// Images in the split.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the split has no images.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Decodes image `i` to RGB; the error names the file (also when its size differs from the
    /// one its annotation gives, which the boxes were checked against).
    pub fn load_image(&self, i: usize) -> Result<Image> {
        let s = &self.samples[i];
        let img = load_image(&s.image)?;
        if (img.width, img.height) != (s.width, s.height) {
            bail!(
                "image {} is {}x{} but its annotation says {}x{}",
                s.image.display(),
                img.width,
                img.height,
                s.width,
                s.height
            );
        }
        Ok(img)
    }

    /// The original category id of each label (`[k - 1]` for label k): COCO's ids, 1..=K for
    /// VOC and YOLO.
    pub fn category_ids(&self) -> &[i64] {
        &self.category_ids
    }

    /// Boxes dropped because they have zero width or height once clamped to their image.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

/// Checks a box read from an annotation against its `width` x `height` image and clamps it to
/// the image: `Ok(None)` for a box of zero width or height, an error (the problem in words) for
/// a non-finite box, a negative size, or a box more than [`BOX_TOLERANCE`] outside the image.
fn check_box(
    raw: [f32; 4],
    width: u32,
    height: u32,
) -> std::result::Result<Option<[f32; 4]>, String> {
    let [x1, y1, x2, y2] = raw;
    if raw.iter().any(|v| !v.is_finite()) {
        return Err(format!("box {raw:?} has a non-finite coordinate"));
    }
    if x2 < x1 || y2 < y1 {
        return Err(format!(
            "box [x1 {x1}, y1 {y1}, x2 {x2}, y2 {y2}] has a negative size (x2 < x1 or y2 < y1)"
        ));
    }
    let (w, h) = (width as f32, height as f32);
    let t = BOX_TOLERANCE;
    if x1 < -t || y1 < -t || x2 > w + t || y2 > h + t {
        return Err(format!(
            "box [x1 {x1}, y1 {y1}, x2 {x2}, y2 {y2}] lies outside the {width}x{height} image"
        ));
    }
    let clamped = [
        x1.clamp(0.0, w),
        y1.clamp(0.0, h),
        x2.clamp(0.0, w),
        y2.clamp(0.0, h),
    ];
    Ok((clamped[2] > clamped[0] && clamped[3] > clamped[1]).then_some(clamped))
}

/// Adds the object of a checked box to `objects`, or counts it in `dropped` when the box has
/// zero size; `area` is the annotation's own area, if it has one.
fn push_object(
    objects: &mut Vec<Object>,
    dropped: &mut usize,
    bbox: Option<[f32; 4]>,
    label: i64,
    iscrowd: bool,
    area: Option<f32>,
) {
    match bbox {
        None => *dropped += 1,
        Some(bbox) => {
            let mut obj = Object {
                bbox,
                label,
                iscrowd,
                area: 0.0,
            };
            obj.area = area.unwrap_or_else(|| obj.box_area());
            objects.push(obj);
        }
    }
}

/// Class names from a `classes.txt`: one a line, surrounding blanks trimmed, empty lines skipped.
fn read_class_list(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read class list {}", path.display()))?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if classes.is_empty() {
        bail!("class list {} names no class", path.display());
    }
    Ok(classes)
}

// ---------------------------------------------------------------------------------------------
// COCO

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnnotation>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: i64,
    file_name: String,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    id: Option<i64>,
    image_id: i64,
    category_id: i64,
    /// `x, y, width, height` in pixels.
    bbox: [f32; 4],
    area: Option<f32>,
    #[serde(default)]
    iscrowd: i64,
}

#[derive(Deserialize)]
struct CocoCategory {
    id: i64,
    name: String,
}

fn open_coco(root: &Path, split: &str) -> Result<DetDataset> {
    let json_path = root
        .join("annotations")
        .join(format!("instances_{split}.json"));
    let bytes = std::fs::read(&json_path)
        .with_context(|| format!("cannot read COCO annotation file {}", json_path.display()))?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let file: CocoFile = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        anyhow!(
            "malformed COCO annotation file {}: at `{}`: {}",
            json_path.display(),
            e.path(),
            e.inner()
        )
    })?;
    let image_dir = [root.join("images").join(split), root.join(split)]
        .into_iter()
        .find(|d| d.is_dir())
        .with_context(|| {
            format!(
                "no image folder for split {split}: neither {} nor {} exists",
                root.join("images").join(split).display(),
                root.join(split).display()
            )
        })?;
    let json = json_path.display();

    if file.categories.is_empty() {
        bail!("{json}: `categories` is empty (no class to detect)");
    }
    let mut label_of = HashMap::new();
    for (k, c) in file.categories.iter().enumerate() {
        if label_of.insert(c.id, k as i64 + 1).is_some() {
            bail!("{json}: category id {} appears twice in `categories`", c.id);
        }
    }
    let mut position = HashMap::new();
    let mut images: Vec<&CocoImage> = file.images.iter().collect();
    images.sort_by_key(|im| im.id);
    let mut samples = Vec::with_capacity(images.len());
    for im in images {
        if position.insert(im.id, samples.len()).is_some() {
            bail!("{json}: image id {} appears twice in `images`", im.id);
        }
        if im.width == 0 || im.height == 0 {
            bail!(
                "{json}: image id {} ({}) has size {}x{}",
                im.id,
                im.file_name,
                im.width,
                im.height
            );
        }
        let path = image_dir.join(&im.file_name);
        if !path.is_file() {
            bail!(
                "{json}: image id {}: missing image file {}",
                im.id,
                path.display()
            );
        }
        samples.push(DetSample {
            image: path,
            image_id: im.id,
            width: im.width,
            height: im.height,
            objects: Vec::new(),
        });
    }

    let mut dropped = 0;
    for (index, a) in file.annotations.iter().enumerate() {
        let name = match a.id {
            Some(id) => format!("annotation id {id}"),
            None => format!("annotations[{index}]"),
        };
        let &i = position
            .get(&a.image_id)
            .with_context(|| format!("{json}: {name}: unknown image id {}", a.image_id))?;
        let &label = label_of.get(&a.category_id).with_context(|| {
            format!(
                "{json}: {name}: unknown category id {} (the categories are {:?})",
                a.category_id,
                file.categories.iter().map(|c| c.id).collect::<Vec<_>>()
            )
        })?;
        let s = &mut samples[i];
        let [x, y, w, h] = a.bbox;
        let bbox = check_box([x, y, x + w, y + h], s.width, s.height)
            .map_err(|e| anyhow!("{json}: {name} (image id {}): {e}", a.image_id))?;
        push_object(
            &mut s.objects,
            &mut dropped,
            bbox,
            label,
            a.iscrowd != 0,
            a.area,
        );
    }
    Ok(DetDataset {
        samples,
        classes: file.categories.iter().map(|c| c.name.clone()).collect(),
        category_ids: file.categories.iter().map(|c| c.id).collect(),
        dropped,
    })
}

// ---------------------------------------------------------------------------------------------
// Pascal VOC

fn open_voc(root: &Path, split: &str) -> Result<DetDataset> {
    let list = root
        .join("ImageSets")
        .join("Main")
        .join(format!("{split}.txt"));
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read VOC image list {}", list.display()))?;
    let class_file = root.join("classes.txt");
    let classes = if class_file.exists() {
        read_class_list(&class_file)?
    } else {
        VOC_CLASSES.iter().map(|c| c.to_string()).collect()
    };
    let label_of: HashMap<&str, i64> = classes
        .iter()
        .enumerate()
        .map(|(k, c)| (c.as_str(), k as i64 + 1))
        .collect();
    let mut samples = Vec::new();
    let mut dropped = 0;
    for (n, line) in text.lines().enumerate() {
        let id = line.trim();
        if id.is_empty() {
            continue;
        }
        if id.split_whitespace().count() != 1 {
            bail!(
                "{} line {}: expected one image id, found `{id}`",
                list.display(),
                n + 1
            );
        }
        let xml = root.join("Annotations").join(format!("{id}.xml"));
        let image = root.join("JPEGImages").join(format!("{id}.jpg"));
        if !image.is_file() {
            bail!(
                "{} line {}: missing image file {}",
                list.display(),
                n + 1,
                image.display()
            );
        }
        let (width, height, objects) =
            read_voc_xml(&xml, &image, &label_of, &classes, &mut dropped)?;
        samples.push(DetSample {
            image,
            image_id: samples.len() as i64,
            width,
            height,
            objects,
        });
    }
    Ok(DetDataset::numbered(samples, classes, dropped))
}

/// The text of child `name` of `node`, trimmed; `None` when there is no such child.
fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .map(|c| c.text().unwrap_or("").trim())
}

/// Reads one VOC annotation: the image size (`<size>`, else the image header) and its objects.
fn read_voc_xml(
    xml: &Path,
    image: &Path,
    label_of: &HashMap<&str, i64>,
    classes: &[String],
    dropped: &mut usize,
) -> Result<(u32, u32, Vec<Object>)> {
    let text = std::fs::read_to_string(xml)
        .with_context(|| format!("cannot read VOC annotation file {}", xml.display()))?;
    let doc = roxmltree::Document::parse(&text)
        .map_err(|e| anyhow!("malformed VOC annotation file {}: {e}", xml.display()))?;
    let ann = doc.root_element();
    if !ann.has_tag_name("annotation") {
        bail!(
            "{}: the root element is <{}>, not <annotation>",
            xml.display(),
            ann.tag_name().name()
        );
    }
    let declared = ann.children().find(|c| c.has_tag_name("size")).map(|size| {
        let get = |n| child_text(size, n).and_then(|t| t.parse::<f64>().ok());
        (get("width"), get("height"))
    });
    // Some VOC-style exports write a size of 0 (or none): the image header then says it.
    let (width, height) = match declared {
        Some((Some(w), Some(h))) if w >= 1.0 && h >= 1.0 => (w as u32, h as u32),
        _ => image_size(image)?,
    };
    let mut objects = Vec::new();
    for (k, obj) in ann
        .children()
        .filter(|c| c.has_tag_name("object"))
        .enumerate()
    {
        let at = format!("{}: object {k}", xml.display());
        let name = child_text(obj, "name").with_context(|| format!("{at}: no <name>"))?;
        // From here on the object is named by its class too.
        let at = format!("{at} ({name})");
        let &label = label_of.get(name).with_context(|| {
            format!(
                "{at}: unknown class `{name}` (the classes are {})",
                classes.join(", ")
            )
        })?;
        let difficult = match child_text(obj, "difficult") {
            None | Some("") | Some("0") => false,
            Some("1") => true,
            Some(other) => bail!("{at}: <difficult> is `{other}`, not 0 or 1"),
        };
        let bndbox = obj
            .children()
            .find(|c| c.has_tag_name("bndbox"))
            .with_context(|| format!("{at}: no <bndbox>"))?;
        let mut raw = [0f32; 4];
        for (v, tag) in raw.iter_mut().zip(["xmin", "ymin", "xmax", "ymax"]) {
            let t =
                child_text(bndbox, tag).with_context(|| format!("{at}: no <{tag}> in <bndbox>"))?;
            *v = t
                .parse()
                .map_err(|_| anyhow!("{at}: <{tag}> is `{t}`, not a number"))?;
        }
        // 1-based inclusive pixel indices → the continuous box covering those pixels.
        let [xmin, ymin, xmax, ymax] = raw;
        let bbox = check_box([xmin - 1.0, ymin - 1.0, xmax, ymax], width, height)
            .map_err(|e| anyhow!("{at}: {e}"))?;
        push_object(&mut objects, dropped, bbox, label, difficult, None);
    }
    Ok((width, height, objects))
}

/// The size of an image file from its header, without decoding it.
fn image_size(path: &Path) -> Result<(u32, u32)> {
    let (w, h) = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image file {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image file {}", path.display()))?
        .into_dimensions()
        .map_err(|e| anyhow!("cannot read the size of image {}: {e}", path.display()))?;
    if w == 0 || h == 0 {
        bail!("image {} has size {w}x{h}", path.display());
    }
    Ok((w, h))
}

// ---------------------------------------------------------------------------------------------
// YOLO (Ultralytics)

/// `names:` of an Ultralytics `data.yaml`: a list, or a map from class index to name.
#[derive(Deserialize)]
#[serde(untagged)]
enum YoloNames {
    List(Vec<String>),
    Map(BTreeMap<i64, String>),
}

#[derive(Deserialize)]
struct YoloDataYaml {
    names: YoloNames,
}

/// The class names of a YOLO dataset: `data.yaml`'s `names`, else `classes.txt`.
fn yolo_classes(root: &Path) -> Result<Vec<String>> {
    let yaml = root.join("data.yaml");
    if yaml.exists() {
        let text = std::fs::read_to_string(&yaml)
            .with_context(|| format!("cannot read {}", yaml.display()))?;
        let data: YoloDataYaml = serde_yaml_ng::from_str(&text).map_err(|e| {
            anyhow!(
                "malformed {}: {e} (expected `names:` as a list of class names or a map {{0: name, 1: name, …}})",
                yaml.display()
            )
        })?;
        let names = match data.names {
            YoloNames::List(v) => v,
            YoloNames::Map(m) => {
                for (&k, i) in m.keys().zip(0i64..) {
                    if k != i {
                        bail!(
                            "{}: the `names` map's keys must count up from 0 without a gap \
                             (class index {i} is missing)",
                            yaml.display()
                        );
                    }
                }
                m.into_values().collect()
            }
        };
        if names.is_empty() {
            bail!("{}: `names` lists no class", yaml.display());
        }
        return Ok(names);
    }
    let txt = root.join("classes.txt");
    if txt.exists() {
        return read_class_list(&txt);
    }
    bail!(
        "no class names: neither {} (with `names:`) nor {} exists",
        yaml.display(),
        txt.display()
    )
}

fn open_yolo(root: &Path, split: &str) -> Result<DetDataset> {
    let classes = yolo_classes(root)?;
    let image_dir = root.join("images").join(split);
    let label_dir = root.join("labels").join(split);
    if !image_dir.is_dir() {
        bail!("no image folder {}", image_dir.display());
    }
    let (paths, _skipped) = list_images(&image_dir)?;
    if paths.is_empty() {
        bail!("{}: no images (jpg, jpeg or png)", image_dir.display());
    }
    let mut samples = Vec::with_capacity(paths.len());
    let mut dropped = 0;
    for image in paths {
        let rel = image
            .strip_prefix(&image_dir)
            .expect("listed under the image folder");
        let label_file = label_dir.join(rel).with_extension("txt");
        let (width, height) = image_size(&image)?;
        let objects = if label_file.exists() {
            read_yolo_labels(&label_file, width, height, classes.len(), &mut dropped)?
        } else {
            Vec::new()
        };
        samples.push(DetSample {
            image,
            image_id: samples.len() as i64,
            width,
            height,
            objects,
        });
    }
    Ok(DetDataset::numbered(samples, classes, dropped))
}

/// Reads one YOLO label file of a `width` x `height` image.
fn read_yolo_labels(
    path: &Path,
    width: u32,
    height: u32,
    num_classes: usize,
    dropped: &mut usize,
) -> Result<Vec<Object>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read YOLO label file {}", path.display()))?;
    let mut objects = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let what = |problem: String| anyhow!("{} line {}: {problem}", path.display(), n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != 5 {
            return Err(what(format!(
                "expected 5 fields `class cx cy w h`, found {} (`{}`)",
                fields.len(),
                line.trim()
            )));
        }
        let class: usize = fields[0]
            .parse()
            .map_err(|_| what(format!("class `{}` is not a class index", fields[0])))?;
        if class >= num_classes {
            return Err(what(format!(
                "unknown class {class} (the dataset names {num_classes} classes, 0..{})",
                num_classes - 1
            )));
        }
        let mut v = [0f32; 4];
        for (x, f) in v.iter_mut().zip(&fields[1..]) {
            *x = f
                .parse()
                .map_err(|_| what(format!("`{f}` is not a number")))?;
        }
        let [cx, cy, w, h] = v;
        let (iw, ih) = (width as f32, height as f32);
        let raw = [
            (cx - w / 2.0) * iw,
            (cy - h / 2.0) * ih,
            (cx + w / 2.0) * iw,
            (cy + h / 2.0) * ih,
        ];
        let bbox = check_box(raw, width, height).map_err(what)?;
        push_object(&mut objects, dropped, bbox, class as i64 + 1, false, None);
    }
    Ok(objects)
}
