//! `create-md`, `dump-md` and `wipe-md`.

use std::path::{Path, PathBuf};
use tandem_meta::dump::{dump, human_bytes};
use tandem_meta::{Existing, FileIo, Layout, MetaIo, Metadata};

/// Where one node's metadata lives, from its resource configuration.
#[derive(Debug)]
pub struct MetaTarget {
    /// Resource name, for messages.
    pub resource: String,
    /// The backing device.
    pub disk: PathBuf,
    /// The external meta-disk, or `None` for internal metadata.
    pub meta_disk: Option<PathBuf>,
    /// AL extents for create-md.
    pub al_extents: u32,
}

impl MetaTarget {
    /// The device holding the metadata.
    fn md_path(&self) -> &Path {
        self.meta_disk.as_deref().unwrap_or(&self.disk)
    }

    fn err(&self, what: impl std::fmt::Display) -> String {
        format!("{}: {}: {what}", self.resource, self.md_path().display())
    }

    fn open(&self, read_only: bool) -> Result<FileIo, String> {
        let io = FileIo::open(self.md_path(), read_only)
            .map_err(|e| self.err(format!("cannot open: {e}")))?;
        io.lock(!read_only).map_err(|e| self.err(e))?;
        Ok(io)
    }
}

fn random_u64() -> Result<u64, String> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    // Zero and the small reserved values mean "none" / "just created".
    Ok(u64::from_le_bytes(b) | 1 << 63)
}

/// `create-md RES [--force]`.
pub fn create_md(t: &MetaTarget, force: bool) -> Result<String, String> {
    let md = t.open(false)?;
    let layout = match &t.meta_disk {
        None => {
            let size = md.size().map_err(|e| t.err(format!("cannot size: {e}")))?;
            Layout::internal(size, t.al_extents).map_err(|e| t.err(e))?
        }
        Some(_) => {
            let data = FileIo::open(&t.disk, true)
                .map_err(|e| format!("{}: {}: cannot open: {e}", t.resource, t.disk.display()))?;
            let data_size = data
                .size()
                .map_err(|e| format!("{}: {}: cannot size: {e}", t.resource, t.disk.display()))?;
            let need = tandem_meta::layout::md_size_for(data_size, t.al_extents);
            // A regular file as meta-disk may start empty: grow it.
            let _ = md.grow_to(need);
            let meta_size = md.size().map_err(|e| t.err(format!("cannot size: {e}")))?;
            Layout::external(data_size, meta_size, t.al_extents).map_err(|e| t.err(e))?
        }
    };
    match Metadata::probe(&md).map_err(|e| t.err(e))? {
        Existing::None => {}
        Existing::Valid(sb) if !force => {
            return Err(t.err(format!(
                "refusing to overwrite existing metadata (device uuid {:#018x}, current uuid {:#018x}; use --force)",
                sb.device_uuid, sb.gen.current
            )))
        }
        Existing::Damaged(a, b) if !force => {
            return Err(t.err(format!(
                "refusing to overwrite damaged metadata (slot A: {a}; slot B: {b}; use --force)"
            )))
        }
        _ => {}
    }
    Metadata::create(&md, &layout, random_u64()?).map_err(|e| t.err(e))?;
    Ok(format!(
        "{}: created {} metadata on {}: {} of data, {} of metadata, al-extents {}",
        t.resource,
        if t.meta_disk.is_some() {
            "external"
        } else {
            "internal"
        },
        t.md_path().display(),
        human_bytes(layout.data_size),
        human_bytes(layout.md_size),
        layout.al_extents
    ))
}

/// `dump-md RES [--json]`.
pub fn dump_md(t: &MetaTarget, json: bool) -> Result<String, String> {
    let md = t.open(true)?;
    let d = dump(&md).map_err(|e| t.err(e))?;
    if json {
        serde_json::to_string_pretty(&d).map_err(|e| t.err(format!("cannot encode JSON: {e}")))
    } else {
        Ok(format!(
            "# resource {}, {}\n{}",
            t.resource,
            t.md_path().display(),
            d.to_text().trim_end()
        ))
    }
}

/// `wipe-md RES`.
pub fn wipe_md(t: &MetaTarget) -> Result<String, String> {
    let md = t.open(false)?;
    match Metadata::probe(&md).map_err(|e| t.err(e))? {
        Existing::None => Ok(format!(
            "{}: no metadata on {}, nothing to wipe",
            t.resource,
            t.md_path().display()
        )),
        _ => {
            Metadata::wipe(&md).map_err(|e| t.err(e))?;
            Ok(format!(
                "{}: wiped the metadata on {}",
                t.resource,
                t.md_path().display()
            ))
        }
    }
}
