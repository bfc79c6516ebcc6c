//! Object detection (paper §6.1, Table 8: the detection transfer study): torchvision's Faster
//! R-CNN with a feature pyramid (`fasterrcnn_resnet50_fpn`'s design) on any backbone of this
//! project's ResNet family, trained by the shared engine like the other tasks.
//!
//! * [`boxes`]: box arithmetic, IoU, NMS (per class too) and the box coder, as tensor operations
//!   that run wherever the tensors are.
//! * [`roi_align`]: RoIAlign (torchvision's `roi_align`, `aligned = false`).
//! * [`dataset`]: COCO JSON, Pascal VOC XML and YOLO txt annotations, one in-memory form.
//! * [`transforms`]: joint image/box augmentation (flip, crop) that keeps boxes right.
//! * [`loader`]: the deterministic batch loader (lists of images of any size, their targets).
//! * [`model`]: the detector: backbone + FPN, RPN, RoI heads, the input transform; parameter
//!   names as torchvision's, so its checkpoints load.
//! * [`coco_eval`]: COCO mAP@[.5:.95], AP50, AP75, AP by object size and per class, computed as
//!   `pycocotools` computes them.

pub mod boxes;
pub mod coco_eval;
pub mod dataset;
pub mod loader;
pub mod model;
pub mod roi_align;
pub mod transforms;
