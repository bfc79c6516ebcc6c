//! The dilated backbone against timm's `output_stride=8` ResNets: same weights (random, BN
//! statistics and affine parameters randomised so every branch matters), same input, eval mode;
//! the last feature maps must agree to 1e-4 (relative to their largest value).
//!
//! timm's ResNet-D (`avg_down`) uses a stride-1 2x2 "same" average pool on a dilated stage's
//! shortcut, where `tricks` uses the identity (the pool has no stride left to apply), so only
//! the A/B/C layouts are compared. Without python/torch/timm/safetensors the test prints why
//! and passes, unless `TRICKS_REQUIRE_PARITY=1` (as `tests/parity.rs`).

mod common;

use common::{python, skip_reference};
use std::process::Command;
use tch::Kind;
use tricks::config::ModelConfig;
use tricks::model::{ModelSpec, ResNet};

const SCRIPT: &str = r#"
import sys, torch, timm
from safetensors.torch import save_file
out = sys.argv[1]
torch.manual_seed(0)
for timm_name in ["resnet18", "resnet50", "resnet50c"]:
    m = timm.create_model(timm_name, pretrained=False, output_stride=8, num_classes=0, global_pool="")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2); mod.running_var.uniform_(0.5, 1.5)
    m.eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        y = m(x)
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, f"{out}/{timm_name}.safetensors")
    save_file({"input": x, "output": y.contiguous()}, f"{out}/{timm_name}.io.safetensors")
"#;

#[test]
fn dilated_backbone_matches_timm_output_stride_8() {
    let py = python();
    if !py.exists() {
        return skip_reference(
            "segmentation parity",
            &format!("no python at {}", py.display()),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(&py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir.path())
        .output()
        .unwrap();
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("ModuleNotFoundError") {
            return skip_reference(
                "segmentation parity",
                &format!(
                    "a python package is missing: {}",
                    err.lines().last().unwrap_or("")
                ),
            );
        }
        panic!("the timm script failed:\n{err}");
    }
    for (timm_name, name, variant) in [
        ("resnet18", "resnet18", "a"),
        ("resnet50", "resnet50", "b"),
        ("resnet50c", "resnet50", "c"),
    ] {
        let spec = ModelSpec::from_config(&ModelConfig {
            name: name.into(),
            variant: variant.into(),
            ..Default::default()
        })
        .unwrap();
        let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = ResNet::backbone(&vs.root(), &spec, 8);
        tricks::checkpoint::load_weights(
            &mut vs,
            &dir.path().join(format!("{timm_name}.safetensors")),
        )
        .unwrap();
        let io = tricks::checkpoint::load(&dir.path().join(format!("{timm_name}.io.safetensors")))
            .unwrap();
        let (x, y_ref) = (&io.tensors["input"], &io.tensors["output"]);
        let y = tch::no_grad(|| net.features(x, false));
        assert_eq!(y.size(), y_ref.size(), "{timm_name}");
        assert_eq!(y.size()[2..], [8, 6], "{timm_name}");
        let err = f64::try_from((&y - y_ref).abs().max()).unwrap()
            / f64::try_from(y_ref.abs().max().to_kind(Kind::Double)).unwrap();
        assert!(err < 1e-4, "{timm_name}: relative error {err}");
    }
}
