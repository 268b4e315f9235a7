//! Metadata benchmark: create, open and replay the metadata of a 1 TiB
//! sparse file, the cost of one activity-log transaction, and bitmap
//! operations at 1 TiB scale. Prints a markdown table.
//!
//!     cargo run --release -p tandem-meta --example md_bench -- [DIR] [SIZE_GIB]
//!
//! DIR (default: the system temp directory) must be on a file system with
//! sparse files; SIZE_GIB defaults to 1024.

use std::time::{Duration, Instant};
use tandem_meta::{FileIo, Layout, Metadata, Placement};

const MIB: u64 = 1 << 20;

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let gib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let size = gib << 30;
    let file = tempfile::Builder::new()
        .prefix("md-bench-")
        .tempfile_in(&dir)?;
    file.as_file().set_len(size)?;
    let path = file.path().to_path_buf();
    let mut rows: Vec<(String, String)> = Vec::new();

    let io = FileIo::open(&path, false)?;
    let layout = Layout::internal(size, 1237)?;
    rows.push((
        "device".into(),
        format!("{gib} GiB sparse file in {}", dir.display()),
    ));
    rows.push((
        "metadata size".into(),
        format!(
            "{} bytes ({:.2} MiB; bitmap {:.2} MiB)",
            layout.md_size,
            layout.md_size as f64 / MIB as f64,
            layout.bm_size as f64 / MIB as f64
        ),
    ));
    let (r, d) = time(|| Metadata::create(&io, &layout, 7));
    r?;
    rows.push(("create-md".into(), ms(d)));

    let (r, d) = time(|| {
        Metadata::open(FileIo::open(&path, false)?, Placement::Internal)
            .map_err(Box::<dyn std::error::Error>::from)
    });
    let (mut md, _) = r?;
    rows.push((
        "open after clean shutdown (read + replay + mark in use)".into(),
        ms(d),
    ));

    // Fill the AL: 1237 cold extents spread over the device, each one AL
    // transaction (write + fdatasync) on a real file.
    let stride = layout.data_size / 4096 / 1237 * 4096;
    let (r, d) = time(|| -> Result<(), tandem_meta::MetaError> {
        for i in 0..1237u64 {
            md.begin_io(i * stride..i * stride + 4096)?;
        }
        Ok(())
    });
    r?;
    rows.push((
        "one AL transaction (cold extent, incl. fdatasync), mean of 1237".into(),
        format!("{:.3} ms", d.as_secs_f64() * 1e3 / 1237.0),
    ));
    // Evictions: extents in flight released, new cold extents evict them
    // (bitmap pages written first when dirty).
    for i in 0..1237u64 {
        md.set_out_of_sync(i * stride..i * stride + 4096)?;
        md.end_io(i * stride..i * stride + 4096);
    }
    let (r, d) = time(|| -> Result<(), tandem_meta::MetaError> {
        for i in 0..200u64 {
            md.begin_io(i * stride + 4 * MIB..i * stride + 4 * MIB + 4096)?;
        }
        Ok(())
    });
    r?;
    rows.push((
        "one AL transaction evicting an extent with a dirty bitmap page, mean of 200".into(),
        format!("{:.3} ms", d.as_secs_f64() * 1e3 / 200.0),
    ));

    // Crash: abandon without a clean close, then open again.
    drop(md.abandon());
    let (r, d) = time(|| {
        Metadata::open(FileIo::open(&path, false)?, Placement::Internal)
            .map_err(Box::<dyn std::error::Error>::from)
    });
    let (mut md, report) = r?;
    rows.push((
        format!(
            "open after a crash: replay {} AL extents, mark {} blocks",
            report.al_active, report.marked_blocks
        ),
        ms(d),
    ));

    // Bitmap at scale: mark everything, count, walk, clear.
    let (n, d) = time(|| md.set_all_out_of_sync());
    rows.push((format!("bitmap: set all {n} bits"), ms(d)));
    let (r, d) = time(|| md.flush_bitmap());
    rows.push((
        format!("bitmap: write back {} pages + fdatasync", r?),
        ms(d),
    ));
    let (runs, d) = time(|| md.bitmap().dirty_ranges(0..u64::MAX).count());
    rows.push((format!("bitmap: iterate dirty ranges ({runs} run)"), ms(d)));
    let (n, d) = time(|| md.set_in_sync(0..layout.data_size));
    rows.push((format!("bitmap: clear all ({} bits)", n?), ms(d)));
    let (_, d) = time(|| md.bitmap().count());
    rows.push((
        "bitmap: count".into(),
        format!("{:.3} us", d.as_secs_f64() * 1e6),
    ));
    let (r, d) = time(|| md.close());
    r?;
    rows.push(("clean close (write back + superblock)".into(), ms(d)));

    println!("| measurement | result |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    Ok(())
}
