//! A training recipe: a config checked against everything it names.
//!
//! [`crate::config`] is the bottom layer and knows only syntax and ranges ([`Config::validate`]).
//! This layer sits above `model`, `segment` and `train` and below `experiments` and the CLI: it
//! adds the checks that need the model family (`model.name`, `model.variant`, airbench94's keys)
//! or the task's module (`[segment]`). Every config that enters from a person (`tricks train`,
//! `--check`, a study's variants) goes through [`load`] or [`from_toml_str`].

use crate::config::{Config, Task};
use anyhow::Result;
use std::path::Path;

/// Every check of a training config; each error names its key. The order is the model family,
/// then the config's own ranges, then the task's keys, so the first error reported is the same
/// as when these checks all lived in `Config::validate`.
pub fn check(cfg: &Config) -> Result<()> {
    match cfg.task {
        Task::Segmentation | Task::Detection => {
            crate::model::ModelSpec::from_config(&cfg.model).map(|_| ())?
        }
        Task::Classification => crate::model::Classifier::check_config(&cfg.model)?,
    }
    cfg.validate()?;
    if cfg.data.format.is_detection() && cfg.task != Task::Detection {
        anyhow::bail!(
            "key `data.format`: \"{}\" is an annotation format of detection, but task = \"{}\" (set task = \"detection\")",
            format!("{:?}", cfg.data.format).to_lowercase(),
            format!("{:?}", cfg.task).to_lowercase()
        );
    }
    match cfg.task {
        Task::Segmentation => crate::segment::validate_config(cfg)?,
        Task::Detection => crate::detect::validate_config(cfg)?,
        Task::Classification => {}
    }
    Ok(())
}

/// [`Config::load`] with every check of [`check`].
pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
    Config::load_with(path, overrides, check)
}

/// [`Config::from_toml_str`] with every check of [`check`].
pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Config> {
    Config::from_toml_str_with(text, overrides, check)
}

/// [`Config::from_table`] with every check of [`check`].
pub fn from_table(doc: toml::Table, overrides: &[String]) -> Result<Config> {
    Config::from_table_with(doc, overrides, check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!("{:#}", from_toml_str(text, &[]).unwrap_err())
    }

    #[test]
    fn model_keys_are_checked_against_the_model_family() {
        for (text, key) in [
            ("[model]\nvariant = \"e\"\n", "model.variant"),
            ("[model]\nname = \"cifar_resnet21\"\n", "6n+2"),
            ("[model]\nname = \"vgg16\"\n", "model.name"),
            (
                "[model]\nwhiten_bias_epochs = 3\n",
                "model.whiten_bias_epochs",
            ),
            (
                "[model]\nname = \"airbench94\"\nzero_gamma = true\n",
                "model.zero_gamma",
            ),
            (
                "task = \"segmentation\"\n[model]\nname = \"cifar_resnet21\"\n",
                "6n+2",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(key), "{text} → {e}");
            // The config layer alone accepts them: they are not about syntax or ranges.
            if !text.starts_with("task") {
                Config::from_toml_str(text, &[]).unwrap();
            }
        }
    }

    #[test]
    fn segmentation_keys_are_checked_and_ranges_still_are() {
        let e = err("task = \"segmentation\"\n");
        assert!(e.contains("segment.num_classes"), "{e}");
        assert!(Config::from_toml_str("task = \"segmentation\"\n", &[]).is_ok());
        let e = err("[optim]\nlr = -1.0\n");
        assert!(e.contains("optim.lr"), "{e}");
        // A model error comes first, as before the split.
        let e = err("[model]\nvariant = \"e\"\n[optim]\nlr = -1.0\n");
        assert!(e.contains("model.variant"), "{e}");
    }

    #[test]
    fn load_names_the_file_and_every_shipped_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[model]\nvariant = \"e\"\n").unwrap();
        let e = format!("{:#}", load(&bad, &[]).unwrap_err());
        assert!(e.contains("bad.toml") && e.contains("model.variant"), "{e}");

        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for sub in ["cifar10", "imagenet", "paper"] {
            for e in std::fs::read_dir(root.join(sub)).unwrap() {
                let p = e.unwrap().path();
                load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 15, "{n}");
    }
}
