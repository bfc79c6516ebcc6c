//! Download of the official CIFAR-10 / CIFAR-100 binary archives.

use super::cifar::{find_layout, CifarKind};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const CIFAR100_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz";

fn kind_of(which: &str) -> Result<CifarKind> {
    match which {
        "cifar10" => Ok(CifarKind::Cifar10),
        "cifar100" => Ok(CifarKind::Cifar100),
        other => bail!("unknown dataset `{other}` to download: expected `cifar10` or `cifar100`"),
    }
}

/// Downloads the official binary archive of `which` ("cifar10" | "cifar100") and extracts it into
/// `dest`; returns the folder that holds the .bin files (`dest/cifar-10-batches-bin` or
/// `dest/cifar-100-binary`). Nothing is downloaded when that folder already holds the files.
pub fn download_cifar(which: &str, dest: &Path) -> Result<PathBuf> {
    let url = match kind_of(which)? {
        CifarKind::Cifar10 => CIFAR10_URL,
        CifarKind::Cifar100 => CIFAR100_URL,
    };
    download_cifar_from(url, which, dest)
}

/// [`download_cifar`] from a given URL (for mirrors, and for tests).
pub fn download_cifar_from(url: &str, which: &str, dest: &Path) -> Result<PathBuf> {
    let kind = kind_of(which)?;
    let folder = dest.join(kind.archive_folder());
    if let Ok(Some(layout)) = find_layout(&folder, Some(kind)) {
        if layout.dir == folder {
            return Ok(folder);
        }
    }
    fetch_and_extract(url, dest).map_err(|e| {
        anyhow::anyhow!(
            "downloading {} from {url} failed: {e:#}\n\
             If this machine is offline, fetch the archive elsewhere and point --data (key `data.dir`) at a \
             local copy: either an ImageFolder root (train/ and val/ or test/, one folder per class) or the \
             extracted folder that holds the .bin files (e.g. .../{})",
            kind.name(),
            kind.archive_folder()
        )
    })?;
    match find_layout(&folder, Some(kind))? {
        Some(layout) if layout.dir == folder => Ok(folder),
        _ => bail!(
            "the archive from {url} was extracted into {} but {} does not hold the expected {} files ({})",
            dest.display(),
            folder.display(),
            kind.name(),
            kind.expected_files()
        ),
    }
}

/// Streams a .tar.gz into `dest` (extracted first into a temporary folder inside `dest`, then moved).
fn fetch_and_extract(url: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .build();
    let response = agent.get(url).call().map_err(|e| anyhow::anyhow!("{e}"))?;
    let tmp = dest.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        let gz = flate2::read::GzDecoder::new(response.into_reader());
        let mut archive = tar::Archive::new(gz);
        archive
            .unpack(&tmp)
            .context("cannot extract the archive (interrupted download or not a .tar.gz)")?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            let target = dest.join(entry.file_name());
            if target.exists() {
                if target.is_dir() {
                    std::fs::remove_dir_all(&target)?;
                } else {
                    std::fs::remove_file(&target)?;
                }
            }
            std::fs::rename(entry.path(), &target).with_context(|| {
                format!("cannot move the extracted files to {}", target.display())
            })?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_url_gives_a_clear_offline_message() {
        let dir = tempfile::tempdir().unwrap();
        let e = download_cifar_from(
            "http://127.0.0.1:9/cifar-10-binary.tar.gz",
            "cifar10",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("downloading CIFAR-10 from http://127.0.0.1:9/"),
            "{e}"
        );
        assert!(e.contains("failed"), "{e}");
        assert!(
            e.contains("--data") && e.contains("ImageFolder") && e.contains(".bin"),
            "{e}"
        );
        // No partial folders left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn unknown_dataset_name() {
        let e = download_cifar("mnist", Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mnist") && e.contains("cifar10"), "{e}");
    }

    #[test]
    fn existing_extraction_is_reused_without_network() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("cifar-100-binary");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("train.bin"), vec![0u8; 3074]).unwrap();
        std::fs::write(folder.join("test.bin"), vec![0u8; 3074]).unwrap();
        let got =
            download_cifar_from("http://127.0.0.1:9/x.tar.gz", "cifar100", dir.path()).unwrap();
        assert_eq!(got, folder);
    }
}
