//! `AutoUpdater.xml`: the release manifest, in the classic shape and in
//! format 2.
//!
//! [`Manifest::parse`] reads both shapes; [`Manifest::validate`] applies the
//! rules a node checks before anything touches disk, and refuses the classic
//! shape (no sizes, no hashes) for install; [`Manifest::check_offer`] adds the
//! rules that depend on the node (its installed release, the time).
//! [`Manifest::to_xml`] writes format 2.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::chunk::{Chunk, MAX_CHUNK};
use crate::hash::HashParseError;
use crate::version::VersionParseError;
use crate::{Hash, Version};

/// The manifest's file name in a release directory.
pub const MANIFEST_FILE: &str = "AutoUpdater.xml";
/// The detached signature's file name, next to the manifest.
pub const SIGNATURE_FILE: &str = "AutoUpdater.xml.sig";
/// The compressed copy of the manifest (zstd) published beside it: what
/// nodes fetch from the origin and pass between them. It decodes to the
/// exact bytes the signature covers.
pub const PACKED_MANIFEST_FILE: &str = "AutoUpdater.xml.zst";
/// Manifests larger than this (as text) are refused. A 1 GiB release of
/// large files lists about a thousand chunks, a bit over 100 KiB of XML; a
/// tree of a million small files takes about 260 MB of text, 45 MB
/// compressed. Nodes read a manifest as a stream (the signature checked and
/// the files parsed as it is decoded), so this bounds time and disk, not a
/// buffer.
pub const MAX_MANIFEST_BYTES: u64 = 512 * 1024 * 1024;
/// The most files a manifest lists.
pub const MAX_FILES: usize = 1_000_000;
/// The compressed manifest larger than this is refused before it is read
/// whole: nodes hold a manifest compressed.
pub const MAX_PACKED_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// Which shape a manifest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The classic single-machine updater's manifest: file names only.
    Legacy,
    /// `Format="2"`: sizes, modes, whole-file and chunk hashes.
    V2,
}

/// A parsed `AutoUpdater.xml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub format: Format,
    /// `URLAddres@URL`: the base URL the files are published under.
    pub url: String,
    /// `UpdateInfo/UpdateTime@Date`.
    pub update_time: Option<OffsetDateTime>,
    /// `UpdateInfo/Version@Num`.
    pub version: Option<Version>,
    /// `UpdateInfo/Expires@Date`: after this a node refuses the release.
    pub expires: Option<OffsetDateTime>,
    pub files: Vec<UpdateFile>,
    pub restart: Restart,
    /// `Bundles/Bundle`: small files compressed together (see
    /// [`crate::delta`]), in file order.
    pub bundles: Vec<Bundle>,
    /// `Runs/Run`: runs of consecutive chunks compressed together (see
    /// [`crate::delta`]), in chunk order.
    pub runs: Vec<Run>,
}

/// One `Run` element: a zstd frame that decodes to chunks `first` to
/// `first + count` of the release, counted across the file list in order
/// (file by file, each file's chunks in order; at most
/// [`crate::delta::MAX_RUN`] bytes), published as a blob. A node that lacks
/// a stretch of a release (a new program it has no base for) takes it
/// compressed as one stream, not chunk by chunk: compressing each chunk
/// alone loses about a tenth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: usize,
    pub count: usize,
    pub blob: Blob,
}

/// One `Bundle` element: a zstd frame that decodes to files `first ..
/// first + count` of the file list, concatenated in order (at most
/// [`crate::delta::MAX_BUNDLE`] bytes), published as a blob. The many small
/// files of an application tree cross the uplink in requests of a megabyte
/// or more, compressed together, instead of one request each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bundle {
    pub first: usize,
    pub count: usize,
    pub blob: Blob,
}

/// One `UpdateFile` element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateFile {
    /// Path relative to the install directory, `/`-separated.
    pub name: String,
    pub size: Option<u64>,
    /// Unix permission bits (`Mode="755"`, octal).
    pub mode: Option<u32>,
    /// BLAKE3 of the whole file.
    pub hash: Option<Hash>,
    pub chunks: Vec<Chunk>,
    /// `Patch` elements: binary patches that rebuild this file from an
    /// earlier release's file (see [`crate::delta`]).
    pub patches: Vec<Patch>,
    /// Compressed copies of this file's chunks (`Chunk@PackedSize`,
    /// `Chunk@PackedHash`), by chunk hash.
    pub packed: BTreeMap<Hash, Blob>,
}

/// A file published beside the release under its own hash (a patch or a
/// compressed chunk): `lanup-store/blobs/<hash>`. The manifest names its
/// size and hash, so nothing unsigned is ever decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blob {
    pub size: u64,
    pub hash: Hash,
}

/// One `Patch` element: a zstd frame that, decoded with bytes
/// `base_offset..base_offset + base_length` of the file whose hash is
/// `from` as its reference, yields bytes `offset..offset + length` of this
/// file. A file's patches from one base cover it whole, in order, each
/// ending on a chunk boundary, so each rebuilds whole chunks and memory
/// stays bounded by [`crate::delta::MAX_PATCH_OUTPUT`] and
/// [`crate::delta::MAX_PATCH_REFERENCE`] whatever the file's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    /// BLAKE3 of the whole base file.
    pub from: Hash,
    pub offset: u64,
    pub length: u64,
    pub base_offset: u64,
    pub base_length: u64,
    pub blob: Blob,
}

/// `RestartApp`: whether the application is restarted after an update, and
/// which one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub allow: bool,
    /// `AppName@Name`: the application's process name.
    pub app_name: Option<String>,
    /// `AppName@Exe` (format 2): the listed file that starts the
    /// application, when it is not simply `Name`.
    pub exe: Option<String>,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            allow: true,
            app_name: None,
            exe: None,
        }
    }
}

/// Everything that can be wrong with a manifest. Each message names the
/// element or file and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("manifest is {size} bytes, more than the {max} bytes lanup accepts")]
    TooLarge { size: u64, max: u64 },
    #[error("manifest is not UTF-8 text")]
    NotUtf8,
    #[error("manifest lists more than the {MAX_FILES} files lanup accepts")]
    TooManyFiles,
    #[error("manifest could not be read: {0}")]
    Read(String),
    #[error("manifest is not well-formed XML: {0}")]
    Xml(String),
    #[error(
        "manifest Format=\"{0}\" is not supported (lanup reads the classic shape and format 2)"
    )]
    UnsupportedFormat(String),
    #[error("manifest has no {0} element")]
    MissingElement(&'static str),
    #[error("manifest {element} has no {attribute} attribute")]
    MissingAttribute {
        element: String,
        attribute: &'static str,
    },
    #[error("manifest UpdateInfo has neither Version nor UpdateTime: nothing says which release this is")]
    NoVersionOrDate,
    #[error("manifest Version Num=\"{value}\": {reason}")]
    InvalidVersion {
        value: String,
        reason: VersionParseError,
    },
    #[error(
        "manifest {element} Date=\"{value}\": not a date (use 2026-11-20 or 2026-11-20T08:00:00Z)"
    )]
    InvalidDate {
        element: &'static str,
        value: String,
    },
    #[error("manifest ReStart Allow=\"{0}\": expected Yes or No")]
    InvalidRestart(String),
    #[error(
        "manifest UpdateFile \"{file}\": {attribute}=\"{value}\" is not a whole number of bytes"
    )]
    InvalidSize {
        file: String,
        attribute: &'static str,
        value: String,
    },
    #[error("manifest UpdateFile \"{file}\": Mode=\"{value}\" is not octal permission bits (at most 777)")]
    InvalidMode { file: String, value: String },
    #[error("manifest UpdateFile \"{file}\": {element} Hash=\"{value}\" is malformed: {reason}")]
    InvalidHash {
        file: String,
        element: String,
        value: String,
        reason: HashParseError,
    },
    #[error("{}", legacy_message())]
    Legacy,
    #[error("manifest UpdateFileList lists no files")]
    EmptyFileList,
    #[error("manifest UpdateFile \"{0}\": empty file name")]
    EmptyPath(String),
    #[error("manifest UpdateFile \"{0}\": absolute path; names must be relative to the install directory")]
    AbsolutePath(String),
    #[error("manifest UpdateFile \"{0}\": Windows drive letter; names must be relative to the install directory")]
    DriveLetter(String),
    #[error("manifest UpdateFile \"{0}\": path leaves the install directory (\"..\")")]
    ParentDir(String),
    #[error("manifest UpdateFile {0:?}: NUL or control character in the name")]
    ControlCharacter(String),
    #[error("manifest UpdateFile \"{0}\": not a normalised path (use '/' between parts, no empty, '.' or trailing parts)")]
    NotNormalised(String),
    #[error("manifest UpdateFile \"{0}\" is listed twice")]
    DuplicateFile(String),
    #[error("manifest UpdateFile \"{file}\" is also used as a folder by \"{other}\"")]
    FileIsFolder { file: String, other: String },
    #[error("manifest UpdateFile \"{file}\": Size is {size} but its chunks add up to {chunk_sum}")]
    SizeMismatch {
        file: String,
        size: u64,
        chunk_sum: u64,
    },
    #[error("manifest UpdateFile \"{file}\": chunk {index} has size {size}, outside 1..={max}")]
    ChunkSize {
        file: String,
        index: usize,
        size: u64,
        max: u64,
    },
    #[error("manifest UpdateFile \"{file}\": Patch {index}: {reason}")]
    BadPatch {
        file: String,
        index: usize,
        reason: String,
    },
    #[error("manifest UpdateFile \"{file}\": chunk {index}'s packed copy is {packed} bytes, not smaller than the chunk's {size}")]
    BadPacked {
        file: String,
        index: usize,
        packed: u64,
        size: u64,
    },
    #[error("manifest Bundle {index}: {reason}")]
    BadBundle { index: usize, reason: String },
    #[error("manifest Run {index}: {reason}")]
    BadRun { index: usize, reason: String },
    #[error("manifest AppName Exe=\"{0}\" is not a file the manifest lists")]
    UnknownExe(String),
    #[error("release {release} expired at {expires}")]
    Expired { release: String, expires: String },
    #[error("release {offered} is not newer than the installed {installed}; lanup does not downgrade silently")]
    NotNewer { offered: String, installed: String },
}

fn legacy_message() -> &'static str {
    "this is a classic AutoUpdater.xml (no Format=\"2\", no sizes, hashes or signature): lanup \
     will not install from it. Publish the release properly with `lanup publish --dir RELEASE_DIR \
     --version V --app NAME --url BASE_URL --key PUBLISHER_KEY --out OUT --from-legacy \
     AutoUpdater.xml`, which hashes every file and signs the manifest"
}

/// The folder a node keeps the release named `name` in (under
/// `staging/` and `releases/`): the name, with the `:` of a date-named
/// release, which Windows refuses in file names, as `.`. Versions hold no
/// `:`, so no two releases share a folder.
pub fn release_folder(name: &str) -> String {
    name.replace(':', ".")
}

impl Manifest {
    /// Parses either shape. Checks syntax: required elements and attributes,
    /// numbers, dates, hashes. The rules that make a manifest installable are
    /// in [`Manifest::validate`].
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: bytes.len() as u64,
                max: MAX_MANIFEST_BYTES,
            });
        }
        let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        let text = std::str::from_utf8(bytes).map_err(|_| ManifestError::NotUtf8)?;
        xml::CONVERT_ERROR.with(|c| c.borrow_mut().take());
        let xml: xml::AutoUpdater = quick_xml::de::from_str(text).map_err(|e| {
            xml::CONVERT_ERROR
                .with(|c| c.borrow_mut().take())
                .unwrap_or_else(|| ManifestError::Xml(e.to_string()))
        })?;
        Manifest::from_xml(xml)
    }

    /// Parses a manifest read as a stream (a compressed copy as it is
    /// decoded), with the bounds of [`Manifest::parse`]: no more than
    /// [`MAX_MANIFEST_BYTES`] are read, and files become values one
    /// element at a time, so the text is never held whole.
    pub fn parse_reader<R: std::io::BufRead>(mut reader: R) -> Result<Manifest, ManifestError> {
        let read_error = |e: std::io::Error| ManifestError::Read(e.to_string());
        let head = reader.fill_buf().map_err(read_error)?;
        if head.starts_with(b"\xEF\xBB\xBF") {
            reader.consume(3);
        }
        xml::CONVERT_ERROR.with(|c| c.borrow_mut().take());
        let bounded = xml::Bounded {
            inner: reader,
            left: MAX_MANIFEST_BYTES,
        };
        let mut de = quick_xml::de::Deserializer::from_reader(bounded);
        let xml = <xml::AutoUpdater as serde::Deserialize>::deserialize(&mut de).map_err(|e| {
            xml::CONVERT_ERROR
                .with(|c| c.borrow_mut().take())
                .unwrap_or_else(|| ManifestError::Xml(e.to_string()))
        })?;
        Manifest::from_xml(xml)
    }

    fn from_xml(xml: xml::AutoUpdater) -> Result<Manifest, ManifestError> {
        let format = match xml.format.as_deref().map(str::trim) {
            None => Format::Legacy,
            Some("2") => Format::V2,
            Some(other) => return Err(ManifestError::UnsupportedFormat(other.to_owned())),
        };
        let url = xml
            .url
            .ok_or(ManifestError::MissingElement("URLAddres"))?
            .url
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| ManifestError::MissingAttribute {
                element: "URLAddres".into(),
                attribute: "URL",
            })?;
        let info = xml.info.unwrap_or_default();
        let version = info
            .version
            .map(|v| {
                let num = v.num.ok_or_else(|| ManifestError::MissingAttribute {
                    element: "Version".into(),
                    attribute: "Num",
                })?;
                num.parse::<Version>()
                    .map_err(|reason| ManifestError::InvalidVersion { value: num, reason })
            })
            .transpose()?;
        let update_time = parse_date_element(info.update_time, "UpdateTime")?;
        let expires = parse_date_element(info.expires, "Expires")?;
        if version.is_none() && update_time.is_none() {
            return Err(ManifestError::NoVersionOrDate);
        }
        let files = match xml
            .files
            .ok_or(ManifestError::MissingElement("UpdateFileList"))?
            .files
        {
            xml::Files::Read(files) => files,
            xml::Files::Text(listed) => listed
                .into_iter()
                .map(UpdateFile::from_xml)
                .collect::<Result<Vec<_>, _>>()?,
        };
        // Exactly as long as the list: a node holds a large release's
        // manifest for as long as it is staged or installed.
        let mut files = files;
        files.shrink_to_fit();
        let restart = match xml.restart {
            None => Restart::default(),
            Some(r) => Restart {
                allow: match r.restart.and_then(|a| a.allow) {
                    None => true,
                    Some(a) => match a.trim().to_ascii_lowercase().as_str() {
                        "yes" | "true" | "1" => true,
                        "no" | "false" | "0" => false,
                        _ => return Err(ManifestError::InvalidRestart(a)),
                    },
                },
                app_name: r
                    .app_name
                    .as_ref()
                    .and_then(|n| n.name.clone())
                    .filter(|n| !n.is_empty()),
                exe: r.app_name.and_then(|n| n.exe).filter(|n| !n.is_empty()),
            },
        };
        let bundles = xml
            .bundles
            .map(|b| b.bundles)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, b)| {
                let (first, count, blob) = b
                    .parse()
                    .map_err(|reason| ManifestError::BadBundle { index, reason })?;
                Ok(Bundle { first, count, blob })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        let runs = xml
            .runs
            .map(|r| r.runs)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(index, r)| {
                let (first, count, blob) = r
                    .parse()
                    .map_err(|reason| ManifestError::BadRun { index, reason })?;
                Ok(Run { first, count, blob })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        Ok(Manifest {
            format,
            url,
            update_time,
            version,
            expires,
            files,
            restart,
            bundles,
            runs,
        })
    }

    /// Checks the rules that make a manifest fit to install, whatever node
    /// reads it: format 2, every file with a safe relative name, a size, a
    /// hash and chunks that add up to the size, no file listed twice.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format == Format::Legacy {
            return Err(ManifestError::Legacy);
        }
        if self.files.is_empty() {
            return Err(ManifestError::EmptyFileList);
        }
        let mut names = HashSet::with_capacity(self.files.len());
        for file in &self.files {
            check_file_name(&file.name)?;
            if !names.insert(file.name.as_str()) {
                return Err(ManifestError::DuplicateFile(file.name.clone()));
            }
            let element = || format!("UpdateFile \"{}\"", file.name);
            let size = file.size.ok_or_else(|| ManifestError::MissingAttribute {
                element: element(),
                attribute: "Size",
            })?;
            if file.hash.is_none() {
                return Err(ManifestError::MissingAttribute {
                    element: element(),
                    attribute: "Hash",
                });
            }
            let mut chunk_sum = 0u64;
            for (index, chunk) in file.chunks.iter().enumerate() {
                if chunk.size == 0 || chunk.size > MAX_CHUNK as u64 {
                    return Err(ManifestError::ChunkSize {
                        file: file.name.clone(),
                        index,
                        size: chunk.size,
                        max: MAX_CHUNK as u64,
                    });
                }
                chunk_sum += chunk.size;
            }
            if chunk_sum != size {
                return Err(ManifestError::SizeMismatch {
                    file: file.name.clone(),
                    size,
                    chunk_sum,
                });
            }
            for (index, chunk) in file.chunks.iter().enumerate() {
                if let Some(packed) = file.packed.get(&chunk.hash) {
                    if packed.size >= chunk.size {
                        return Err(ManifestError::BadPacked {
                            file: file.name.clone(),
                            index,
                            packed: packed.size,
                            size: chunk.size,
                        });
                    }
                }
            }
            crate::delta::check_patches(file).map_err(|(index, reason)| {
                ManifestError::BadPatch {
                    file: file.name.clone(),
                    index,
                    reason,
                }
            })?;
        }
        crate::delta::check_bundles(self)
            .map_err(|(index, reason)| ManifestError::BadBundle { index, reason })?;
        crate::delta::check_runs(self)
            .map_err(|(index, reason)| ManifestError::BadRun { index, reason })?;
        if let Some(exe) = &self.restart.exe {
            if !names.contains(exe.as_str()) {
                return Err(ManifestError::UnknownExe(exe.clone()));
            }
        }
        // A name that is also a folder of another name cannot both be
        // installed.
        for file in &self.files {
            let mut prefix = file.name.as_str();
            while let Some((parent, _)) = prefix.rsplit_once('/') {
                if names.contains(parent) {
                    return Err(ManifestError::FileIsFolder {
                        file: parent.to_owned(),
                        other: file.name.clone(),
                    });
                }
                prefix = parent;
            }
        }
        Ok(())
    }

    /// [`Manifest::validate`], then the rules that depend on the node: the
    /// release has not expired at `now`, and it is newer than what is
    /// installed.
    pub fn check_offer(
        &self,
        installed: Option<&Manifest>,
        now: OffsetDateTime,
    ) -> Result<(), ManifestError> {
        self.validate()?;
        if let Some(expires) = self.expires {
            if expires <= now {
                return Err(ManifestError::Expired {
                    release: self.release_name(),
                    expires: format_date(expires),
                });
            }
        }
        if let Some(installed) = installed {
            if self.compare_release(installed) != Ordering::Greater {
                return Err(ManifestError::NotNewer {
                    offered: self.release_name(),
                    installed: installed.release_name(),
                });
            }
        }
        Ok(())
    }

    /// Orders releases as the classic updater did: by Version when both have
    /// one, otherwise by UpdateTime.
    pub fn compare_release(&self, other: &Manifest) -> Ordering {
        match (&self.version, &other.version) {
            (Some(a), Some(b)) => a.cmp(b),
            _ => self.update_time.cmp(&other.update_time),
        }
    }

    /// Which of two releases a site that moves one release at a time takes
    /// up: of one application the greater version (or date); of different
    /// applications (the site's application and lanup itself), the one
    /// published later, so that every node settles on the same one whatever
    /// order it heard them in.
    pub fn compare_succession(&self, other: &Manifest) -> Ordering {
        if self.restart.app_name == other.restart.app_name {
            self.compare_release(other)
        } else {
            self.update_time.cmp(&other.update_time)
        }
    }

    /// The version, or the update date when there is none.
    pub fn release_name(&self) -> String {
        match (&self.version, self.update_time) {
            (Some(v), _) => v.to_string(),
            (None, Some(t)) => format_date(t),
            (None, None) => "(unnamed)".into(),
        }
    }

    /// The folder a node keeps this release in: see [`release_folder`].
    pub fn release_folder(&self) -> String {
        release_folder(&self.release_name())
    }

    /// Total bytes of all files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().filter_map(|f| f.size).sum()
    }

    /// Writes the manifest as format 2 XML.
    pub fn to_xml(&self) -> Result<String, ManifestError> {
        let xml = xml::AutoUpdater {
            format: Some("2".into()),
            url: Some(xml::Url {
                url: Some(self.url.clone()),
            }),
            info: Some(xml::Info {
                update_time: self.update_time.map(|d| xml::Date {
                    date: Some(format_date(d)),
                }),
                version: self.version.as_ref().map(|v| xml::VersionNum {
                    num: Some(v.to_string()),
                }),
                expires: self.expires.map(|d| xml::Date {
                    date: Some(format_date(d)),
                }),
            }),
            files: Some(xml::FileList {
                files: xml::Files::Text(self.files.iter().map(UpdateFile::to_xml).collect()),
            }),
            restart: Some(xml::RestartApp {
                restart: Some(xml::Allow {
                    allow: Some(if self.restart.allow { "Yes" } else { "No" }.into()),
                }),
                app_name: (self.restart.app_name.is_some() || self.restart.exe.is_some()).then(
                    || xml::Name {
                        name: self.restart.app_name.clone(),
                        exe: self.restart.exe.clone(),
                    },
                ),
            }),
            bundles: (!self.bundles.is_empty()).then(|| xml::Bundles {
                bundles: self
                    .bundles
                    .iter()
                    .map(|b| xml::Bundle::new(b.first, b.count, &b.blob))
                    .collect(),
            }),
            runs: (!self.runs.is_empty()).then(|| xml::Runs {
                runs: self
                    .runs
                    .iter()
                    .map(|r| xml::Bundle::new(r.first, r.count, &r.blob))
                    .collect(),
            }),
        };
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n");
        let mut ser = quick_xml::se::Serializer::new(&mut out);
        ser.indent(' ', 2);
        xml.serialize(ser)
            .map_err(|e| ManifestError::Xml(e.to_string()))?;
        out.push('\n');
        Ok(out)
    }
}

impl UpdateFile {
    fn from_xml(f: xml::File) -> Result<UpdateFile, ManifestError> {
        let name = f.name.ok_or_else(|| ManifestError::MissingAttribute {
            element: "UpdateFile".into(),
            attribute: "FileName",
        })?;
        let size = f.size.map(|s| parse_size(&name, "Size", s)).transpose()?;
        let mode = f
            .mode
            .map(|m| match u32::from_str_radix(m.trim(), 8) {
                Ok(bits) if bits <= 0o777 && !m.trim().is_empty() => Ok(bits),
                _ => Err(ManifestError::InvalidMode {
                    file: name.clone(),
                    value: m,
                }),
            })
            .transpose()?;
        let hash = f
            .hash
            .map(|h| parse_hash(&name, "UpdateFile".into(), h))
            .transpose()?;
        let mut packed = BTreeMap::new();
        let chunks = f
            .chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let element = format!("Chunk {i}");
                let attribute = |attribute| ManifestError::MissingAttribute {
                    element: format!("UpdateFile \"{name}\" {element}"),
                    attribute,
                };
                let size = c.size.ok_or_else(|| attribute("Size"))?;
                let hash = c.hash.ok_or_else(|| attribute("Hash"))?;
                let chunk = Chunk {
                    size: parse_size(&name, "Chunk Size", size)?,
                    hash: parse_hash(&name, element.clone(), hash)?,
                };
                match (c.packed_size, c.packed_hash) {
                    (None, None) => {}
                    (Some(size), Some(hash)) => {
                        packed.insert(
                            chunk.hash,
                            Blob {
                                size: parse_size(&name, "Chunk PackedSize", size)?,
                                hash: parse_hash(&name, format!("{element} Packed"), hash)?,
                            },
                        );
                    }
                    (None, Some(_)) => return Err(attribute("PackedSize")),
                    (Some(_), None) => return Err(attribute("PackedHash")),
                }
                Ok(chunk)
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        // Exactly as long as the file's chunk list: one each for the many
        // small files of a large tree, not the collector's spare room.
        let mut chunks = chunks;
        chunks.shrink_to_fit();
        let patches = f
            .patches
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let element = format!("Patch {i}");
                let attribute = |attribute| ManifestError::MissingAttribute {
                    element: format!("UpdateFile \"{name}\" {element}"),
                    attribute,
                };
                let number = |value: Option<String>, attr: &'static str| {
                    parse_size(&name, attr, value.ok_or_else(|| attribute(attr))?)
                };
                Ok(Patch {
                    from: parse_hash(
                        &name,
                        format!("{element} From"),
                        p.from.ok_or_else(|| attribute("From"))?,
                    )?,
                    offset: number(p.offset, "Offset")?,
                    length: number(p.length, "Length")?,
                    base_offset: number(p.base_offset, "BaseOffset")?,
                    base_length: number(p.base_length, "BaseLength")?,
                    blob: Blob {
                        size: number(p.size, "Size")?,
                        hash: parse_hash(
                            &name,
                            element.clone(),
                            p.hash.ok_or_else(|| attribute("Hash"))?,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        Ok(UpdateFile {
            name,
            size,
            mode,
            hash,
            chunks,
            patches,
            packed,
        })
    }

    fn to_xml(&self) -> xml::File {
        xml::File {
            name: Some(self.name.clone()),
            size: self.size.map(|s| s.to_string()),
            mode: self.mode.map(|m| format!("{m:o}")),
            hash: self.hash.map(|h| h.to_string()),
            chunks: self
                .chunks
                .iter()
                .map(|c| {
                    let packed = self.packed.get(&c.hash);
                    xml::Chunk {
                        size: Some(c.size.to_string()),
                        hash: Some(c.hash.to_string()),
                        packed_size: packed.map(|b| b.size.to_string()),
                        packed_hash: packed.map(|b| b.hash.to_string()),
                    }
                })
                .collect(),
            patches: self
                .patches
                .iter()
                .map(|p| xml::Patch {
                    from: Some(p.from.to_string()),
                    offset: Some(p.offset.to_string()),
                    length: Some(p.length.to_string()),
                    base_offset: Some(p.base_offset.to_string()),
                    base_length: Some(p.base_length.to_string()),
                    size: Some(p.blob.size.to_string()),
                    hash: Some(p.blob.hash.to_string()),
                })
                .collect(),
        }
    }
}

/// Checks that `name` is a safe, normalised relative path: it cannot leave
/// the install directory on Unix or Windows.
pub fn check_file_name(name: &str) -> Result<(), ManifestError> {
    let err = |make: fn(String) -> ManifestError| Err(make(name.to_owned()));
    if name.is_empty() {
        return err(ManifestError::EmptyPath);
    }
    if name.chars().any(char::is_control) {
        return err(ManifestError::ControlCharacter);
    }
    if name.starts_with('/') || name.starts_with('\\') {
        return err(ManifestError::AbsolutePath);
    }
    let b = name.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return err(ManifestError::DriveLetter);
    }
    let parts = name.split(['/', '\\']);
    if parts.clone().any(|p| p == "..") {
        return err(ManifestError::ParentDir);
    }
    if name.contains('\\') || name.split('/').any(|p| p.is_empty() || p == ".") {
        return err(ManifestError::NotNormalised);
    }
    Ok(())
}

/// Names Windows keeps for devices, with or without an extension.
const WINDOWS_DEVICES: [&str; 24] = [
    "CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "COM1", "COM2", "COM3", "COM4", "COM5",
    "COM6", "COM7", "COM8", "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8",
    "LPT9",
];

/// Why Windows cannot hold a file at `name` (a name [`check_file_name`]
/// accepts), if it cannot: a character it refuses, a part ending in a dot
/// or a space (which it drops), or a device name. `lanup publish` refuses
/// such a release unless it is for Linux nodes only.
pub fn windows_refuses(name: &str) -> Option<String> {
    for part in name.split('/') {
        if let Some(c) = part
            .chars()
            .find(|c| matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*'))
        {
            return Some(format!(
                "\"{part}\" holds {c:?}, which Windows refuses in a file name"
            ));
        }
        if part.ends_with('.') || part.ends_with(' ') {
            return Some(format!(
                "\"{part}\" ends in a dot or a space, which Windows drops from a file name"
            ));
        }
        let stem = part.split('.').next().unwrap_or(part).trim_end_matches(' ');
        if WINDOWS_DEVICES.iter().any(|d| d.eq_ignore_ascii_case(stem)) {
            return Some(format!(
                "\"{part}\" is the device {} on Windows, not a file",
                stem.to_ascii_uppercase()
            ));
        }
    }
    None
}

/// Two file names of `names` that differ only in case, which Windows (its
/// file systems ignore case) would take for one file, if there are any.
pub fn case_twins<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<(&'a str, &'a str)> {
    let mut seen = std::collections::HashMap::new();
    for name in names {
        if let Some(first) = seen.insert(name.to_lowercase(), name) {
            return Some((first, name));
        }
    }
    None
}

/// Formats a manifest date: RFC 3339 in UTC.
pub fn format_date(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Reads a manifest date: RFC 3339 (`2026-11-20T08:00:00Z`) or a plain day
/// (`2005-02-02`, as the classic manifest writes it; midnight UTC).
pub fn parse_date(value: &str) -> Option<OffsetDateTime> {
    let value = value.trim();
    if let Ok(t) = OffsetDateTime::parse(value, &Rfc3339) {
        return Some(t);
    }
    let day = time::Date::parse(
        value,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .ok()?;
    Some(day.midnight().assume_utc())
}

fn parse_date_element(
    el: Option<xml::Date>,
    element: &'static str,
) -> Result<Option<OffsetDateTime>, ManifestError> {
    let Some(el) = el else { return Ok(None) };
    let value = el.date.ok_or_else(|| ManifestError::MissingAttribute {
        element: element.into(),
        attribute: "Date",
    })?;
    parse_date(&value)
        .map(Some)
        .ok_or(ManifestError::InvalidDate { element, value })
}

fn parse_size(file: &str, attribute: &'static str, value: String) -> Result<u64, ManifestError> {
    value
        .trim()
        .parse()
        .map_err(|_| ManifestError::InvalidSize {
            file: file.to_owned(),
            attribute,
            value,
        })
}

fn parse_hash(file: &str, element: String, value: String) -> Result<Hash, ManifestError> {
    value
        .trim()
        .parse()
        .map_err(|reason| ManifestError::InvalidHash {
            file: file.to_owned(),
            element,
            value,
            reason,
        })
}

/// The chunks a manifest needs, each once, with how many bytes they are.
/// Identical chunks inside or across files are one entry.
pub fn unique_chunks<'a>(files: impl IntoIterator<Item = &'a UpdateFile>) -> BTreeMap<Hash, u64> {
    files
        .into_iter()
        .flat_map(|f| f.chunks.iter())
        .map(|c| (c.hash, c.size))
        .collect()
}

/// The XML as written, attribute values as text: conversion to typed values
/// happens in one place with errors that name the element.
mod xml {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(rename = "AutoUpdater")]
    pub(super) struct AutoUpdater {
        #[serde(rename = "@Format", default, skip_serializing_if = "Option::is_none")]
        pub(super) format: Option<String>,
        #[serde(rename = "URLAddres", default, skip_serializing_if = "Option::is_none")]
        pub(super) url: Option<Url>,
        #[serde(
            rename = "UpdateInfo",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub(super) info: Option<Info>,
        #[serde(
            rename = "UpdateFileList",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub(super) files: Option<FileList>,
        #[serde(
            rename = "RestartApp",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub(super) restart: Option<RestartApp>,
        /// After everything a classic reader knows, which ignores it.
        #[serde(rename = "Bundles", default, skip_serializing_if = "Option::is_none")]
        pub(super) bundles: Option<Bundles>,
        #[serde(rename = "Runs", default, skip_serializing_if = "Option::is_none")]
        pub(super) runs: Option<Runs>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Bundles {
        #[serde(rename = "Bundle", default)]
        pub(super) bundles: Vec<Bundle>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Runs {
        #[serde(rename = "Run", default)]
        pub(super) runs: Vec<Bundle>,
    }

    /// A `Bundle` or a `Run`: a span (first, count) and its blob.
    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Bundle {
        #[serde(rename = "@First", default)]
        pub(super) first: Option<String>,
        #[serde(rename = "@Count", default)]
        pub(super) count: Option<String>,
        #[serde(rename = "@Size", default)]
        pub(super) size: Option<String>,
        #[serde(rename = "@Hash", default)]
        pub(super) hash: Option<String>,
    }

    impl Bundle {
        pub(super) fn new(first: usize, count: usize, blob: &super::Blob) -> Bundle {
            Bundle {
                first: Some(first.to_string()),
                count: Some(count.to_string()),
                size: Some(blob.size.to_string()),
                hash: Some(blob.hash.to_string()),
            }
        }

        /// The span and blob, or why not.
        pub(super) fn parse(self) -> Result<(usize, usize, super::Blob), String> {
            let number = |attribute: &str, value: Option<String>| {
                let value = value.ok_or_else(|| format!("no {attribute} attribute"))?;
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{attribute}=\"{value}\" is not a number"))
            };
            let hash = self.hash.ok_or_else(|| "no Hash attribute".to_string())?;
            Ok((
                number("First", self.first)? as usize,
                number("Count", self.count)? as usize,
                super::Blob {
                    size: number("Size", self.size)?,
                    hash: hash
                        .trim()
                        .parse()
                        .map_err(|e| format!("Hash=\"{hash}\" is malformed: {e}"))?,
                },
            ))
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Url {
        #[serde(rename = "@URL", default)]
        pub(super) url: Option<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Info {
        #[serde(
            rename = "UpdateTime",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub(super) update_time: Option<Date>,
        #[serde(rename = "Version", default, skip_serializing_if = "Option::is_none")]
        pub(super) version: Option<VersionNum>,
        #[serde(rename = "Expires", default, skip_serializing_if = "Option::is_none")]
        pub(super) expires: Option<Date>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Date {
        #[serde(rename = "@Date", default)]
        pub(super) date: Option<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct VersionNum {
        #[serde(rename = "@Num", default)]
        pub(super) num: Option<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct FileList {
        #[serde(rename = "UpdateFile", default)]
        pub(super) files: Files,
    }

    /// The `UpdateFile` elements: written from their text form, read
    /// straight into [`super::UpdateFile`]s one element at a time, so a
    /// manifest of 100,000 files never holds every file's attributes as
    /// text and as values at once (megabytes at the moment a node adopts
    /// a release).
    #[derive(Debug)]
    pub(super) enum Files {
        Text(Vec<File>),
        Read(Vec<super::UpdateFile>),
    }

    impl Default for Files {
        fn default() -> Self {
            Files::Read(Vec::new())
        }
    }

    /// A reader that fails once more than `left` bytes came through,
    /// leaving [`super::ManifestError::TooLarge`] for the parse to return.
    pub(super) struct Bounded<R> {
        pub(super) inner: R,
        pub(super) left: u64,
    }

    impl<R: std::io::BufRead> Bounded<R> {
        fn over(&self) -> std::io::Error {
            let max = super::MAX_MANIFEST_BYTES;
            CONVERT_ERROR.with(|c| {
                *c.borrow_mut() = Some(super::ManifestError::TooLarge { size: max + 1, max })
            });
            std::io::Error::other("manifest too large")
        }
    }

    impl<R: std::io::BufRead> std::io::Read for Bounded<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = std::io::BufRead::fill_buf(self)?.len().min(buf.len());
            buf[..n].copy_from_slice(&self.inner.fill_buf()?[..n]);
            std::io::BufRead::consume(self, n);
            Ok(n)
        }
    }

    impl<R: std::io::BufRead> std::io::BufRead for Bounded<R> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            let left = self.left;
            let over = {
                let buf = self.inner.fill_buf()?;
                !buf.is_empty() && left == 0
            };
            if over {
                return Err(self.over());
            }
            let buf = self.inner.fill_buf()?;
            Ok(&buf[..buf.len().min(left as usize)])
        }

        fn consume(&mut self, n: usize) {
            self.left -= n as u64;
            self.inner.consume(n);
        }
    }

    std::thread_local! {
        /// Why an element did not convert, for [`super::Manifest::parse`]
        /// to return as itself rather than as the XML reader's text.
        pub(super) static CONVERT_ERROR: std::cell::RefCell<Option<super::ManifestError>> =
            const { std::cell::RefCell::new(None) };
    }

    impl Serialize for Files {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self {
                Files::Text(files) => files.serialize(serializer),
                Files::Read(_) => Err(serde::ser::Error::custom(
                    "files read from XML are written from their text form",
                )),
            }
        }
    }

    impl<'de> Deserialize<'de> for Files {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Files;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("UpdateFile elements")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Files, A::Error> {
                    let mut files = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                    while let Some(file) = seq.next_element::<File>()? {
                        if files.len() == super::MAX_FILES {
                            let e = super::ManifestError::TooManyFiles;
                            let text = e.to_string();
                            CONVERT_ERROR.with(|c| *c.borrow_mut() = Some(e));
                            return Err(serde::de::Error::custom(text));
                        }
                        match super::UpdateFile::from_xml(file) {
                            Ok(f) => files.push(f),
                            Err(e) => {
                                let text = e.to_string();
                                CONVERT_ERROR.with(|c| *c.borrow_mut() = Some(e));
                                return Err(serde::de::Error::custom(text));
                            }
                        }
                    }
                    Ok(Files::Read(files))
                }
            }
            deserializer.deserialize_seq(Visit)
        }
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct File {
        #[serde(rename = "@FileName", default)]
        pub(super) name: Option<String>,
        #[serde(rename = "@Size", default, skip_serializing_if = "Option::is_none")]
        pub(super) size: Option<String>,
        #[serde(rename = "@Mode", default, skip_serializing_if = "Option::is_none")]
        pub(super) mode: Option<String>,
        #[serde(rename = "@Hash", default, skip_serializing_if = "Option::is_none")]
        pub(super) hash: Option<String>,
        #[serde(rename = "Chunk", default)]
        pub(super) chunks: Vec<Chunk>,
        /// After every `Chunk`: readers that predate patches skip them.
        #[serde(rename = "Patch", default, skip_serializing_if = "Vec::is_empty")]
        pub(super) patches: Vec<Patch>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Chunk {
        #[serde(rename = "@Size", default)]
        pub(super) size: Option<String>,
        #[serde(rename = "@Hash", default)]
        pub(super) hash: Option<String>,
        #[serde(
            rename = "@PackedSize",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub(super) packed_size: Option<String>,
        #[serde(
            rename = "@PackedHash",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        pub(super) packed_hash: Option<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Patch {
        #[serde(rename = "@From", default)]
        pub(super) from: Option<String>,
        #[serde(rename = "@Offset", default)]
        pub(super) offset: Option<String>,
        #[serde(rename = "@Length", default)]
        pub(super) length: Option<String>,
        #[serde(rename = "@BaseOffset", default)]
        pub(super) base_offset: Option<String>,
        #[serde(rename = "@BaseLength", default)]
        pub(super) base_length: Option<String>,
        #[serde(rename = "@Size", default)]
        pub(super) size: Option<String>,
        #[serde(rename = "@Hash", default)]
        pub(super) hash: Option<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct RestartApp {
        #[serde(rename = "ReStart", default, skip_serializing_if = "Option::is_none")]
        pub(super) restart: Option<Allow>,
        #[serde(rename = "AppName", default, skip_serializing_if = "Option::is_none")]
        pub(super) app_name: Option<Name>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Allow {
        #[serde(rename = "@Allow", default)]
        pub(super) allow: Option<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Name {
        #[serde(rename = "@Name", default, skip_serializing_if = "Option::is_none")]
        pub(super) name: Option<String>,
        #[serde(rename = "@Exe", default, skip_serializing_if = "Option::is_none")]
        pub(super) exe: Option<String>,
    }
}

#[cfg(test)]
mod tests;
