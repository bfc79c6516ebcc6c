//! ImageFolder datasets (`<split>/<class>/**/*.{jpg,jpeg,png}`) and image decoding.
//!
//! Files whose extension is not jpg/jpeg/png (any case) are ignored, as are hidden files and
//! folders (names starting with `.`, e.g. macOS `._x.jpg` resource forks). A file with an image
//! extension that does not decode is a bad image: `image()` returns an error naming the file.
//! Symbolic links are followed, but never into a folder already listed (a loop), and the walk
//! stops 16 levels down; what is skipped that way (and link loops, dangling links) is named in a
//! warning and kept in [`ImageFolder::skipped_entries`].

use super::{has_image_extension, Dataset, Image};
use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use std::collections::HashSet;
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Largest accepted image side (pixels); larger declared sizes are an error, not an allocation.
pub const MAX_IMAGE_SIDE: u32 = 32_768;
/// Largest decoded buffer (bytes) one image may need (256 MiB: ~89 Mpixel RGB8).
pub const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;

/// The decoding limits: a decompression bomb (e.g. a PNG declaring 100k x 100k) is an error.
pub fn decode_limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_BYTES);
    l
}

/// Decodes JPEG or PNG bytes (format from the content, not the name) to 8-bit RGB: greyscale,
/// grey+alpha, RGBA (alpha dropped), 16-bit and CMYK JPEG are converted. The error is the problem
/// in words, without the file name.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<Image, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => f,
        Ok(other) => {
            return Err(format!("{other:?} image: only JPEG and PNG are supported"));
        }
        Err(_) => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(format!(
                "not a JPEG or PNG image (unrecognised content, {} bytes, starting with {})",
                bytes.len(),
                head.join(" ")
            ));
        }
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decode_limits());
    let img = reader
        .decode()
        .map_err(|e| format!("{format:?} decoding failed: {e}"))?;
    Ok(to_rgb(img))
}

fn to_rgb(img: DynamicImage) -> Image {
    let rgb = img.into_rgb8();
    let (width, height) = rgb.dimensions();
    Image {
        width,
        height,
        rgb: rgb.into_raw(),
    }
}

/// Reads and decodes one image file; the error names the file and the problem.
pub fn load_image(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read image file {}", path.display()))?;
    decode_image(&bytes).map_err(|e| anyhow::anyhow!("bad image {}: {e}", path.display()))
}

/// The evaluation split folder of an ImageFolder root: `val/`, else `test/`.
pub fn val_dir(root: &Path) -> Result<PathBuf> {
    for name in ["val", "test"] {
        let d = root.join(name);
        if d.is_dir() {
            return Ok(d);
        }
    }
    bail!(
        "no val/ or test/ folder in {} (the evaluation split of an ImageFolder root)",
        root.display()
    )
}

/// One split of an ImageFolder tree.
pub struct ImageFolder {
    dir: PathBuf,
    classes: Vec<String>,
    paths: Vec<PathBuf>,
    labels: Vec<i64>,
    skipped: Vec<(PathBuf, String)>,
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list folder {}", dir.display()))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// The state of one split's folder walk: the folders already listed (by device and inode, so a
/// symbolic link back to a folder of the walk is seen as one) and the entries skipped, with why.
#[derive(Default)]
struct Walk {
    visited: HashSet<(u64, u64)>,
    skipped: Vec<(PathBuf, String)>,
}

/// Largest folder depth below a class folder that is listed.
const MAX_DEPTH: usize = 16;

fn folder_id(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// Why an entry that cannot be followed is skipped, or `None` to ignore it silently (a broken
/// entry that is neither an image nor possibly a folder, e.g. a dangling `notes.txt` link).
fn unreadable_reason(path: &Path, err: &std::io::Error) -> Option<String> {
    if !has_image_extension(path) && path.extension().is_some() {
        return None;
    }
    let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    Some(if err.raw_os_error() == Some(libc::ELOOP) {
        "symbolic link loop".to_string()
    } else if link && err.kind() == std::io::ErrorKind::NotFound {
        "dangling symbolic link".to_string()
    } else {
        format!("cannot read: {err}")
    })
}

/// Image files under `dir`, recursively, sorted. Symbolic links are followed, but a folder already
/// listed (a link to the split, a class folder or one of its ancestors: a loop) is skipped, and so
/// is anything more than [`MAX_DEPTH`] levels down, so the walk always ends; every skipped entry is
/// recorded in `walk` with its reason.
fn collect_images(dir: &Path, depth: usize, walk: &mut Walk, out: &mut Vec<PathBuf>) -> Result<()> {
    for path in list_dir(dir)? {
        if is_hidden(&path) {
            continue;
        }
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                if let Some(reason) = unreadable_reason(&path, &e) {
                    walk.skipped.push((path, reason));
                }
                continue;
            }
        };
        if meta.is_dir() {
            if depth + 1 > MAX_DEPTH {
                walk.skipped
                    .push((path, format!("more than {MAX_DEPTH} folder levels deep")));
            } else if !walk.visited.insert(folder_id(&meta)) {
                walk.skipped.push((
                    path,
                    "link to a folder already listed (a symbolic link loop or a second link to it)"
                        .to_string(),
                ));
            } else {
                collect_images(&path, depth + 1, walk, out)?;
            }
        } else if has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Entries a folder walk skipped, each with its reason.
pub type SkippedEntries = Vec<(PathBuf, String)>;

/// Image files (jpg/jpeg/png, any case) under `dir`, recursively and sorted, walked as a split's
/// class folders are (hidden entries ignored, symbolic links followed but never into a folder
/// already listed, at most [`MAX_DEPTH`] levels down); also the entries skipped, with why.
pub fn list_images(dir: &Path) -> Result<(Vec<PathBuf>, SkippedEntries)> {
    let meta =
        std::fs::metadata(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    let mut walk = Walk::default();
    walk.visited.insert(folder_id(&meta));
    let mut out = Vec::new();
    collect_images(dir, 0, &mut walk, &mut out)?;
    Ok((out, walk.skipped))
}

impl ImageFolder {
    /// Scans `dir` (a split folder such as `root/train`): every sub-folder is a class.
    pub fn open(dir: &Path) -> Result<ImageFolder> {
        if !dir.is_dir() {
            bail!("split folder {} does not exist", dir.display());
        }
        let class_dirs: Vec<PathBuf> = list_dir(dir)?
            .into_iter()
            .filter(|p| !is_hidden(p) && p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            bail!(
                "no class folders in {} (expected one sub-folder of images per class)",
                dir.display()
            );
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut paths = Vec::new();
        let mut labels = Vec::new();
        // The split and its class folders count as listed: a link back to any of them is a loop
        // (or would count another class's images as this one's).
        let mut walk = Walk::default();
        for d in std::iter::once(dir).chain(class_dirs.iter().map(|p| p.as_path())) {
            let meta = std::fs::metadata(d)
                .with_context(|| format!("cannot read folder {}", d.display()))?;
            walk.visited.insert(folder_id(&meta));
        }
        for (label, cdir) in class_dirs.iter().enumerate() {
            let name = cdir
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| {
                    format!("class folder name is not valid UTF-8: {}", cdir.display())
                })?
                .to_string();
            let mut files = Vec::new();
            collect_images(cdir, 0, &mut walk, &mut files)?;
            if files.is_empty() {
                bail!(
                    "empty class folder {}: no .jpg, .jpeg or .png files in it",
                    cdir.display()
                );
            }
            labels.extend(std::iter::repeat_n(label as i64, files.len()));
            paths.extend(files);
            classes.push(name);
        }
        if !walk.skipped.is_empty() {
            eprintln!(
                "warning: {}: skipped {} entr{}: {}",
                dir.display(),
                walk.skipped.len(),
                if walk.skipped.len() == 1 { "y" } else { "ies" },
                describe_skipped(dir, &walk.skipped)
            );
        }
        Ok(ImageFolder {
            dir: dir.to_path_buf(),
            classes,
            paths,
            labels,
            skipped: walk.skipped,
        })
    }

    /// The entries the walk skipped (symbolic link loops, dangling links, folders already listed
    /// or too deep), each with its reason.
    pub fn skipped_entries(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    /// The split folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of sample `index`.
    pub fn path(&self, index: usize) -> &Path {
        &self.paths[index]
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn label(&self, index: usize) -> i64 {
        self.labels[index]
    }
    fn image(&self, index: usize) -> Result<Image> {
        load_image(&self.paths[index])
    }
    fn describe(&self, index: usize) -> String {
        self.paths[index].display().to_string()
    }
    fn skipped_files(&self) -> Vec<String> {
        self.skipped
            .iter()
            .map(|(p, why)| format!("{} ({why})", p.display()))
            .collect()
    }
}

/// The first skipped entries, relative to the split folder, with their reasons (one line).
fn describe_skipped(dir: &Path, skipped: &[(PathBuf, String)]) -> String {
    const SHOWN: usize = 10;
    let mut parts: Vec<String> = skipped
        .iter()
        .take(SHOWN)
        .map(|(p, why)| format!("{} ({why})", p.strip_prefix(dir).unwrap_or(p).display()))
        .collect();
    if skipped.len() > SHOWN {
        parts.push(format!("and {} more", skipped.len() - SHOWN));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, format).unwrap();
        buf.into_inner()
    }

    #[test]
    fn png_colour_types_become_rgb8() {
        let grey = ImageBuffer::from_fn(3, 2, |x, y| Luma([(x * 10 + y) as u8]));
        let im = decode_image(&encode(DynamicImage::ImageLuma8(grey), ImageFormat::Png)).unwrap();
        assert_eq!((im.width, im.height), (3, 2));
        assert_eq!(im.pixel(2, 1), [21, 21, 21]);

        let ga = ImageBuffer::from_fn(2, 2, |x, _| LumaA([x as u8 * 100, 7]));
        let im = decode_image(&encode(DynamicImage::ImageLumaA8(ga), ImageFormat::Png)).unwrap();
        assert_eq!(im.pixel(1, 0), [100, 100, 100]);

        let rgba = ImageBuffer::from_fn(2, 1, |x, _| Rgba([1, 2, x as u8 + 3, 0]));
        let im = decode_image(&encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png)).unwrap();
        assert_eq!(im.rgb, vec![1, 2, 3, 1, 2, 4]);

        let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> =
            ImageBuffer::from_fn(1, 1, |_, _| Rgb([65535, 0, 257 * 128]));
        let im = decode_image(&encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png)).unwrap();
        assert_eq!(im.rgb, vec![255, 0, 128]);

        let l16: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_fn(1, 1, |_, _| Luma([257 * 9]));
        let im = decode_image(&encode(DynamicImage::ImageLuma16(l16), ImageFormat::Png)).unwrap();
        assert_eq!(im.rgb, vec![9, 9, 9]);
    }

    #[test]
    fn jpeg_grey_and_rgb() {
        let grey = ImageBuffer::from_fn(16, 8, |_, _| Luma([128u8]));
        let im = decode_image(&encode(DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg)).unwrap();
        assert_eq!((im.width, im.height, im.rgb.len()), (16, 8, 16 * 8 * 3));
        assert!(im.rgb.iter().all(|&v| (v as i32 - 128).abs() <= 2));
        let rgb = ImageBuffer::from_fn(16, 16, |_, _| Rgb([200u8, 30, 90]));
        let im = decode_image(&encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Jpeg)).unwrap();
        let p = im.pixel(5, 5);
        assert!(
            (p[0] as i32 - 200).abs() <= 4
                && (p[1] as i32 - 30).abs() <= 4
                && (p[2] as i32 - 90).abs() <= 4,
            "{p:?}"
        );
    }

    /// An 8x8 CMYK JPEG (Adobe APP14, inverted CMYK as Photoshop/Pillow write it) of CMYK
    /// (0, 255, 255, 0) = pure red; written by Pillow 13 (`Image.new("CMYK", (8, 8), (0, 255, 255, 0))`).
    const CMYK_JPEG: [u8; 354] = [
        0xff, 0xd8, 0xff, 0xee, 0x00, 0x0e, 0x41, 0x64, 0x6f, 0x62, 0x65, 0x00, 0x64, 0x00, 0x00,
        0x00, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x02, 0x01, 0x01, 0x01, 0x01, 0x01, 0x02,
        0x01, 0x01, 0x01, 0x02, 0x02, 0x02, 0x02, 0x02, 0x04, 0x03, 0x02, 0x02, 0x02, 0x02, 0x05,
        0x04, 0x04, 0x03, 0x04, 0x06, 0x05, 0x06, 0x06, 0x06, 0x05, 0x06, 0x06, 0x06, 0x07, 0x09,
        0x08, 0x06, 0x07, 0x09, 0x07, 0x06, 0x06, 0x08, 0x0b, 0x08, 0x09, 0x0a, 0x0a, 0x0a, 0x0a,
        0x0a, 0x06, 0x08, 0x0b, 0x0c, 0x0b, 0x0a, 0x0c, 0x09, 0x0a, 0x0a, 0x0a, 0xff, 0xc0, 0x00,
        0x14, 0x08, 0x00, 0x08, 0x00, 0x08, 0x04, 0x43, 0x11, 0x00, 0x4d, 0x11, 0x00, 0x59, 0x11,
        0x00, 0x4b, 0x11, 0x00, 0xff, 0xc4, 0x00, 0x1f, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01,
        0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04,
        0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xff, 0xc4, 0x00, 0xb5, 0x10, 0x00, 0x02, 0x01,
        0x03, 0x03, 0x02, 0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7d, 0x01, 0x02,
        0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22,
        0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
        0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27,
        0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47,
        0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66,
        0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85,
        0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2,
        0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8,
        0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5,
        0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea,
        0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xff, 0xda, 0x00, 0x0e, 0x04,
        0x43, 0x00, 0x4d, 0x00, 0x59, 0x00, 0x4b, 0x00, 0x00, 0x3f, 0x00, 0xfd, 0xfc, 0xaf, 0xe7,
        0xfe, 0xbf, 0x9f, 0xfa, 0xfd, 0xfc, 0xaf, 0xff, 0xd9,
    ];

    #[test]
    fn cmyk_jpeg_becomes_rgb() {
        let im = decode_image(&CMYK_JPEG).unwrap();
        assert_eq!((im.width, im.height, im.rgb.len()), (8, 8, 8 * 8 * 3));
        let p = im.pixel(3, 3);
        assert!(
            p[0] > 200 && p[1] < 60 && p[2] < 60,
            "CMYK red decoded as {p:?}"
        );
    }

    #[test]
    fn bad_bytes_are_errors_with_reasons() {
        assert!(decode_image(&[]).unwrap_err().contains("empty file"));
        let e = decode_image(b"hello, this is text").unwrap_err();
        assert!(e.contains("not a JPEG or PNG"), "{e}");
        let e = decode_image(b"GIF89a\x01\x00\x01\x00\x00\x00\x00").unwrap_err();
        assert!(e.contains("Gif") && e.contains("only JPEG and PNG"), "{e}");
        let rgb = ImageBuffer::from_fn(16, 16, |x, _| Rgb([x as u8, 0, 0]));
        let png = encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Png);
        let e = decode_image(&png[..png.len() / 2]).unwrap_err();
        assert!(e.contains("Png decoding failed"), "{e}");
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = flate2::Crc::new();
        c.update(bytes);
        c.sum()
    }

    #[test]
    fn png_decompression_bomb_is_an_error() {
        let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        v.extend_from_slice(&13u32.to_be_bytes());
        v.extend_from_slice(&ihdr);
        v.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        // A small IDAT (a real bomb would hold a highly compressed stream).
        let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
        v.extend_from_slice(&((idat.len() - 4) as u32).to_be_bytes());
        v.extend_from_slice(idat);
        v.extend_from_slice(&crc32(idat).to_be_bytes());
        let e = decode_image(&v).unwrap_err();
        assert!(e.contains("Png decoding failed"), "{e}");
        assert!(
            e.to_lowercase().contains("limit")
                || e.to_lowercase().contains("large")
                || e.to_lowercase().contains("memory"),
            "{e}"
        );
    }

    #[test]
    fn jpeg_decompression_bomb_is_an_error() {
        let rgb = ImageBuffer::from_fn(8, 8, |_, _| Rgb([1u8, 2, 3]));
        let mut jpg = encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Jpeg);
        let sof = jpg
            .windows(2)
            .position(|w| w == [0xFF, 0xC0])
            .expect("SOF0 marker");
        // SOF0: FF C0, length(2), precision(1), height(2), width(2).
        jpg[sof + 5..sof + 7].copy_from_slice(&65_000u16.to_be_bytes());
        jpg[sof + 7..sof + 9].copy_from_slice(&65_000u16.to_be_bytes());
        let e = decode_image(&jpg).unwrap_err();
        assert!(e.contains("Jpeg decoding failed"), "{e}");
    }
}
