//! The study file: a base config, a list of named variants (each a set of config overrides), the
//! seeds, and how variants combine (independently, or cumulatively as in the paper's Table 6).
//!
//! Everything is resolved and validated here, before a single step of training: an unknown
//! study key, a bad override key or value in any variant, a missing base config or data folder
//! all fail at once, naming the variant and the key.

use crate::config::{self, Config, Task};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How the variants of a study are built from the base config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each variant is the base config plus its own overrides (paper Tables 4 and 5).
    #[default]
    Independent,
    /// Each variant adds its overrides to those of every variant above it (paper Table 6).
    Cumulative,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Independent => "independent",
            Mode::Cumulative => "cumulative",
        }
    }
}

/// The study file as written (strict: an unknown key is an error naming it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    /// Shown in the table and plot titles (default: the study file's name).
    name: Option<String>,
    /// Free text copied into `table.md`.
    description: Option<String>,
    /// Base config file, relative to the study file's folder or to the current folder.
    base: Option<String>,
    /// Or the base config inline.
    base_config: Option<toml::Table>,
    #[serde(default)]
    mode: Mode,
    seeds: Option<Vec<u64>>,
    /// Overrides `data.dir`.
    data: Option<String>,
    /// Overrides `train.epochs`.
    epochs: Option<usize>,
    /// Default device when the command line names none ("cpu", "cuda", "cuda:N", "auto").
    device: Option<String>,
    /// Overrides applied to every variant, before the variant's own.
    #[serde(default)]
    overrides: toml::Table,
    #[serde(default)]
    variants: Vec<VariantFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantFile {
    name: String,
    description: Option<String>,
    #[serde(default)]
    overrides: toml::Table,
}

/// One resolved variant: its name, the folder name of its runs and its config (seed not set).
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    /// Folder under `<out>/runs/` (the name, with characters unsafe in paths replaced).
    pub dir: String,
    pub description: Option<String>,
    /// This variant's own overrides, as `key = value` lines.
    pub overrides: Vec<(String, toml::Value)>,
    /// Base + study overrides + (cumulative: every earlier variant's) + own overrides.
    pub config: Config,
    /// True when the base config or an override sets `train.threads` (then it is kept as is).
    pub sets_threads: bool,
}

/// A parsed, resolved and validated study.
#[derive(Debug, Clone)]
pub struct Study {
    pub name: String,
    pub description: Option<String>,
    pub mode: Mode,
    pub seeds: Vec<u64>,
    pub device: Option<String>,
    /// Where the base config came from ("inline" for `[base_config]`).
    pub base: String,
    pub variants: Vec<Variant>,
    /// The study file's text, copied into the output folder.
    pub text: String,
}

/// What `report` needs to know about a study, written as `<out>/study.json` by `ablate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// Classification (top-1/top-5) or segmentation (mIoU/pixel accuracy under those names).
    #[serde(default)]
    pub task: Task,
    pub description: Option<String>,
    pub mode: Mode,
    pub seeds: Vec<u64>,
    pub base: String,
    pub variants: Vec<ManifestVariant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestVariant {
    pub name: String,
    pub dir: String,
    pub description: Option<String>,
    /// The variant's own overrides as `key = value`.
    pub overrides: Vec<String>,
}

impl Study {
    /// Reads and resolves a study file; see [`Study::from_toml_str`].
    pub fn load(path: &Path) -> Result<Study> {
        Study::load_with(path, &[], None)
    }

    /// [`Study::load`] with `key=value` overrides from the command line (`ablate --set`), applied
    /// after the study's own top-level `overrides`, before each variant's, and seeds in place of
    /// the study's (`ablate --seeds`).
    pub fn load_with(path: &Path, sets: &[String], seeds: Option<&[u64]>) -> Result<Study> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read study file {}", path.display()))?;
        let mut text = text;
        if !sets.is_empty() || seeds.is_some() {
            let mut doc: toml::Table = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("invalid study {}: {e}", path.display()))?;
            if let Some(seeds) = seeds {
                let list = seeds
                    .iter()
                    .map(|&s| toml::Value::Integer(s as i64))
                    .collect();
                doc.insert("seeds".into(), toml::Value::Array(list));
            }
            let mut over = match doc.remove("overrides") {
                Some(toml::Value::Table(t)) => t,
                _ => toml::Table::new(),
            };
            for set in sets {
                let (key, _) = set
                    .split_once('=')
                    .with_context(|| format!("--set `{set}` must look like key=value"))?;
                let mut one = toml::Table::new();
                config::apply_override(&mut one, set)?;
                // Study overrides are dotted keys in one inline table.
                over.insert(key.trim().to_string(), flatten(&one).remove(0).1);
            }
            doc.insert("overrides".into(), toml::Value::Table(over));
            text = toml::to_string(&doc)?;
        }
        let dir = path.parent().unwrap_or_else(|| Path::new(""));
        let default_name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "study".into());
        Study::from_toml_str(&text, dir, &default_name)
            .with_context(|| format!("invalid study {}", path.display()))
    }

    /// Parses a study, resolves the config of every variant and validates them all.
    /// Relative paths (`base`, `data`) are tried against `study_dir` and the current folder.
    pub fn from_toml_str(text: &str, study_dir: &Path, default_name: &str) -> Result<Study> {
        let file: StudyFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (base_table, base) = match (&file.base, &file.base_config) {
            (Some(_), Some(_)) => {
                bail!("give either `base` (a config file) or `[base_config]`, not both")
            }
            (None, None) => {
                bail!("missing `base` (a config file) or `[base_config]` (an inline config)")
            }
            (None, Some(t)) => (t.clone(), "inline [base_config]".to_string()),
            (Some(b), None) => {
                let path = find_file(study_dir, b, "base config")?;
                // As `tricks train` reads it: `extends` chains resolved, relative to each file.
                let table = config::load_table(&path, 0)
                    .with_context(|| format!("base config {}", path.display()))?;
                (table, path.display().to_string())
            }
        };
        let seeds = file.seeds.clone().unwrap_or_else(|| vec![1, 2, 3]);
        if seeds.is_empty() {
            bail!("key `seeds` is empty: give at least one seed");
        }
        let mut seen = BTreeSet::new();
        for s in &seeds {
            if !seen.insert(*s) {
                bail!("key `seeds` lists seed {s} twice");
            }
        }
        if file.variants.is_empty() {
            bail!("the study has no variants: add at least one [[variants]] with a `name`");
        }
        if let Some(d) = &file.device {
            crate::device::parse_device(d).with_context(|| "key `device`".to_string())?;
        }

        // The table every variant starts from: base, then `data`/`epochs`, then top-level overrides.
        let mut common = base_table;
        let mut sets_threads = has_key(&common, "train.threads");
        if let Some(d) = &file.data {
            let dir = find_dir(study_dir, d).context("key `data`")?;
            config::set_dotted(&mut common, "data.dir", toml::Value::String(dir))?;
        }
        if let Some(e) = file.epochs {
            config::set_dotted(&mut common, "train.epochs", toml::Value::Integer(e as i64))?;
        }
        let top = flatten(&file.overrides);
        for (k, v) in &top {
            config::set_dotted(&mut common, k, v.clone()).context("key `overrides`")?;
            sets_threads |= k == "train.threads";
        }
        to_config(&common)
            .context("the base config with the study's `data`, `epochs` and `overrides`")?;

        let mut variants: Vec<Variant> = Vec::new();
        let mut acc = common.clone();
        let mut acc_threads = sets_threads;
        let mut dirs = BTreeMap::new();
        for (i, v) in file.variants.iter().enumerate() {
            let label = format!("variant {} (`{}`)", i + 1, v.name);
            if v.name.trim().is_empty() {
                bail!("variant {}: `name` is empty", i + 1);
            }
            if variants.iter().any(|o| o.name == v.name) {
                bail!("{label}: the name is used by an earlier variant");
            }
            let dir = dir_name(&v.name);
            if let Some(other) = dirs.insert(dir.clone(), v.name.clone()) {
                bail!("{label}: its folder name `{dir}` is the same as that of variant `{other}`; rename one");
            }
            let own = flatten(&v.overrides);
            let mut table = match file.mode {
                Mode::Independent => common.clone(),
                Mode::Cumulative => acc.clone(),
            };
            let mut threads = match file.mode {
                Mode::Independent => sets_threads,
                Mode::Cumulative => acc_threads,
            };
            for (k, val) in &own {
                config::set_dotted(&mut table, k, val.clone())
                    .with_context(|| format!("{label}: override `{k}`"))?;
                threads |= k == "train.threads";
            }
            let cfg = to_config(&table).with_context(|| {
                let keys: Vec<&str> = own.iter().map(|(k, _)| k.as_str()).collect();
                format!(
                    "{label} (its overrides: {})",
                    if keys.is_empty() {
                        "none".into()
                    } else {
                        keys.join(", ")
                    }
                )
            })?;
            if let Some(first) = variants.first() {
                if first.config.task != cfg.task {
                    bail!("{label}: key `task` differs from the first variant's: a study compares runs of one task");
                }
            }
            if file.mode == Mode::Cumulative {
                acc = table;
                acc_threads = threads;
            }
            variants.push(Variant {
                name: v.name.clone(),
                dir,
                description: v.description.clone(),
                overrides: own,
                config: cfg,
                sets_threads: threads,
            });
        }
        Ok(Study {
            name: file
                .name
                .clone()
                .unwrap_or_else(|| default_name.to_string()),
            description: file.description.clone(),
            mode: file.mode,
            seeds,
            device: file.device.clone(),
            base,
            variants,
            text: text.to_string(),
        })
    }

    /// Checks what lies outside the configs: every variant's dataset folder and teacher
    /// checkpoint exist. `ablate` calls it before training anything.
    pub fn check_inputs(&self) -> Result<()> {
        for (i, v) in self.variants.iter().enumerate() {
            let label = format!("variant {} (`{}`)", i + 1, v.name);
            let cfg = &v.config;
            if cfg.data.dir.is_empty() {
                bail!("{label}: key `data.dir` is empty: set `data = \"DIR\"` in the study or `data.dir` in the base config");
            }
            if !Path::new(&cfg.data.dir).is_dir() {
                bail!(
                    "{label}: key `data.dir`: dataset folder {} does not exist (paths in configs are relative to the current folder, {})",
                    cfg.data.dir,
                    std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default()
                );
            }
            if !cfg.distill.teacher.is_empty() && !Path::new(&cfg.distill.teacher).is_file() {
                bail!(
                    "{label}: key `distill.teacher`: teacher checkpoint {} does not exist (train the teacher first)",
                    cfg.distill.teacher
                );
            }
            if cfg.task == Task::Segmentation
                && !cfg.segment.backbone.is_empty()
                && !Path::new(&cfg.segment.backbone).is_file()
            {
                bail!(
                    "{label}: key `segment.backbone`: backbone checkpoint {} does not exist (train it first)",
                    cfg.segment.backbone
                );
            }
        }
        Ok(())
    }

    /// The config of one run: the variant's config with the run's seed and thread count.
    pub fn run_config(&self, variant: usize, seed: u64, threads: usize) -> Config {
        let v = &self.variants[variant];
        let mut cfg = v.config.clone();
        cfg.seed = seed;
        if !v.sets_threads {
            cfg.train.threads = threads;
        }
        cfg
    }

    pub fn manifest(&self) -> Manifest {
        Manifest {
            name: self.name.clone(),
            task: self
                .variants
                .first()
                .map(|v| v.config.task)
                .unwrap_or_default(),
            description: self.description.clone(),
            mode: self.mode,
            seeds: self.seeds.clone(),
            base: self.base.clone(),
            variants: self
                .variants
                .iter()
                .map(|v| ManifestVariant {
                    name: v.name.clone(),
                    dir: v.dir.clone(),
                    description: v.description.clone(),
                    overrides: v
                        .overrides
                        .iter()
                        .map(|(k, val)| format!("{k} = {val}"))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The `device` key of a study file, if it has one (for a CLI whose `--device` was not given).
pub fn study_device(path: &Path) -> Result<Option<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read study file {}", path.display()))?;
    let file: StudyFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid study {}: {e}", path.display()))?;
    Ok(file.device)
}

fn to_config(table: &toml::Table) -> Result<Config> {
    crate::recipe::from_toml_str(&toml::to_string(table)?, &[])
}

/// Override tables as `(dotted key, value)`: `{"optim.lr" = 0.2}` and `{optim = {lr = 0.2}}`
/// (or unquoted `optim.lr = 0.2`, which TOML reads as the nested form) mean the same.
fn flatten(table: &toml::Table) -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                other => out.push((key, other.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", table, &mut out);
    out
}

fn has_key(table: &toml::Table, dotted: &str) -> bool {
    let mut t = table;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        match t.get(*p) {
            Some(toml::Value::Table(inner)) if i + 1 < parts.len() => t = inner,
            Some(_) if i + 1 == parts.len() => return true,
            _ => return false,
        }
    }
    false
}

/// A folder name for a variant: letters, digits, `-`, `_`, `.` and `+` are kept, anything else
/// becomes `-`.
pub fn dir_name(name: &str) -> String {
    let s: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.+".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('.').to_string();
    if s.is_empty() {
        "variant".into()
    } else {
        s
    }
}

/// A file given relative to the study's folder or to the current folder (tried in that order).
fn find_file(study_dir: &Path, given: &str, what: &str) -> Result<PathBuf> {
    let p = Path::new(given);
    if p.is_absolute() {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("{what} {given} does not exist");
    }
    let a = study_dir.join(p);
    if a.is_file() {
        return Ok(a);
    }
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    bail!(
        "{what} `{given}` not found: tried {} (relative to the study file's folder) and {} (relative to the current folder)",
        a.display(),
        cwd_join(p)
    )
}

/// A folder given relative to the current folder or to the study's folder (tried in that
/// order, as `--data` is relative to the current folder).
fn find_dir(study_dir: &Path, given: &str) -> Result<String> {
    let p = Path::new(given);
    if p.is_dir() {
        return Ok(given.to_string());
    }
    let a = study_dir.join(p);
    if !p.is_absolute() && a.is_dir() {
        return Ok(a.display().to_string());
    }
    if p.is_absolute() {
        bail!("dataset folder {given} does not exist");
    }
    bail!(
        "dataset folder `{given}` not found: tried {} (relative to the current folder) and {} (relative to the study file's folder)",
        cwd_join(p),
        a.display()
    )
}

fn cwd_join(p: &Path) -> String {
    std::env::current_dir()
        .map(|d| d.join(p).display().to_string())
        .unwrap_or_else(|_| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(text: &str) -> Result<Study> {
        let dir = std::env::temp_dir();
        Study::from_toml_str(text, &dir, "t")
    }

    fn base(extra: &str) -> String {
        let data = std::env::temp_dir().display().to_string();
        format!("seeds = [1]\n{extra}\nbase_config = {{ model = {{ name = \"cifar_resnet20\" }}, data = {{ dir = {data:?} }} }}\n")
    }

    #[test]
    fn cumulative_accumulates_and_independent_does_not() {
        let vars = "[[variants]]\nname = \"a\"\noverrides = { \"optim.schedule\" = \"cosine\" }\n\
                    [[variants]]\nname = \"b\"\noverrides = { loss.label_smoothing = 0.1 }\n";
        for (mode, cos) in [("cumulative", true), ("independent", false)] {
            let text = format!("{}{vars}", base(&format!("mode = \"{mode}\"")));
            let s = study(&text).unwrap();
            let b = &s.variants[1].config;
            assert_eq!(b.loss.label_smoothing, 0.1);
            assert_eq!(b.optim.schedule == config::Schedule::Cosine, cos, "{mode}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = study(&base("sedes = [1]")).unwrap_err();
        assert!(format!("{e:#}").contains("sedes"), "{e:#}");
        let text = format!(
            "{}[[variants]]\nname = \"ok\"\n[[variants]]\nname = \"bad\"\noverrides = {{ \"optim.lrr\" = 1 }}\n",
            base("")
        );
        let e = format!("{:#}", study(&text).unwrap_err());
        assert!(e.contains("variant 2") && e.contains("optim.lrr"), "{e}");
    }

    #[test]
    fn a_base_config_that_extends_another_is_resolved_as_train_does() {
        // As the shipped configs/cifar10/resnet20-all.toml: `extends` a file beside it.
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("configs");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join("parent.toml"),
            "[model]\nname = \"cifar_resnet32\"\n[optim]\nlr = 0.3\nstep_epochs = [1]\n",
        )
        .unwrap();
        std::fs::write(
            sub.join("child.toml"),
            "extends = \"parent.toml\"\n[optim]\nlr = 0.2\n",
        )
        .unwrap();
        let text = format!(
            "base = \"configs/child.toml\"\nseeds = [1]\nepochs = 2\ndata = {:?}\n[[variants]]\nname = \"a\"\n",
            dir.path().display().to_string()
        );
        let s = Study::from_toml_str(&text, dir.path(), "t").unwrap();
        let c = &s.variants[0].config;
        assert_eq!(c.model.name, "cifar_resnet32");
        assert_eq!((c.optim.lr, c.train.epochs), (0.2, 2));
        // What `tricks train` makes of the same file.
        let train =
            crate::recipe::load(&sub.join("child.toml"), &["train.epochs=2".into()]).unwrap();
        assert_eq!(c.optim, train.optim);
        assert_eq!(c.model, train.model);

        // The shipped config this was found with.
        let shipped =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/cifar10/resnet20-all.toml");
        let text = format!(
            "base = {:?}\nseeds = [1]\ndata = {:?}\n[[variants]]\nname = \"all\"\n",
            shipped.display().to_string(),
            dir.path().display().to_string()
        );
        let s = Study::from_toml_str(&text, dir.path(), "t").unwrap();
        let train = crate::recipe::load(&shipped, &[]).unwrap();
        assert_eq!(s.variants[0].config.optim, train.optim);
        assert_eq!(s.variants[0].config.mixup, train.mixup);
    }

    #[test]
    fn dir_names_are_path_safe() {
        assert_eq!(dir_name("+label smoothing"), "+label-smoothing");
        assert_eq!(dir_name("../x"), "-x");
    }

    #[test]
    fn command_line_sets_apply_after_the_study_overrides_and_before_a_variants_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(
            &path,
            "mode = \"independent\"\nseeds = [1]\noverrides = { \"optim.lr\" = 0.3 }\n\
             [base_config]\nmodel = { name = \"cifar_resnet8\" }\ndata = { dir = \"d\" }\n\
             [[variants]]\nname = \"a\"\n[[variants]]\nname = \"b\"\n\
             overrides = { \"train.epochs\" = 7 }\n",
        )
        .unwrap();
        let sets = ["train.epochs=2".to_string(), "optim.lr=0.05".to_string()];
        let s = Study::load_with(&path, &sets, None).unwrap();
        let (a, b) = (&s.variants[0].config, &s.variants[1].config);
        assert_eq!((a.optim.lr, a.train.epochs), (0.05, 2));
        assert_eq!((b.optim.lr, b.train.epochs), (0.05, 7));
        let plain = Study::load(&path).unwrap();
        assert_eq!(plain.variants[0].config.optim.lr, 0.3);
        assert!(Study::load_with(&path, &["nokey".to_string()], None).is_err());
        assert_eq!(plain.seeds, vec![1]);
        let reseeded = Study::load_with(&path, &[], Some(&[4, 5])).unwrap();
        assert_eq!(reseeded.seeds, vec![4, 5]);
        assert_eq!(reseeded.variants[0].config.optim.lr, 0.3);
        let err = Study::load_with(&path, &[], Some(&[4, 4])).unwrap_err();
        assert!(format!("{err:#}").contains("seed 4 twice"), "{err:#}");
    }
}
