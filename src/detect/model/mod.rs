//! Faster R-CNN with a feature pyramid, torchvision's `fasterrcnn_resnet50_fpn` design on any
//! ImageNet ResNet of this project's family (built up by the commits that follow).
//!
//! * [`transform`]: normalise, resize by the shorter side, pad into a batch; map boxes back.
//! * [`backbone`]: the ResNet body and the FPN (P2–P6).
//! * [`anchors`]: one anchor size per level, three aspect ratios.
//! * [`sampling`]: the matcher and the balanced positive/negative sampler both stages use.

pub mod anchors;
pub mod backbone;
pub mod sampling;
pub mod transform;
