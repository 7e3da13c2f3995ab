//! `vessel img …`: disk image tools (create, info, convert, check, resize), with the flags
//! a qemu-img user looks for (`-f`, `-O`, `-b`, `-F`, `-o cluster_size=…`, `--output=json`).
//!
//! Needs in crates/vessel/Cargo.toml: block, anyhow, clap, serde_json, indicatif.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use block::{CreateOptions, Format};

/// The `img` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImgCommand {
    /// Create a disk image (raw or qcow2), optionally on top of a backing file.
    Create {
        /// Format of the new image.
        #[arg(short = 'f', long = "format", default_value = "raw", value_parser = parse_format)]
        format: Format,
        /// Backing file (qcow2 only); a relative name is relative to the new image.
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Format of the backing file (probed when not given).
        #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
        backing_format: Option<Format>,
        /// Format options, comma separated: cluster_size=SIZE.
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Do not print what was created.
        #[arg(short = 'q', long)]
        quiet: bool,
        filename: PathBuf,
        /// Virtual size, e.g. 10G, 512M, 4096 (defaults to the backing file's size).
        size: Option<String>,
    },
    /// Show an image's format, sizes, backing file and flags.
    Info {
        /// Format of the image (probed when not given).
        #[arg(short = 'f', long = "format", value_parser = parse_format)]
        format: Option<Format>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Output format, as qemu-img: human or json.
        #[arg(long, value_parser = ["human", "json"])]
        output: Option<String>,
        /// Also describe every image of the backing chain.
        #[arg(long)]
        backing_chain: bool,
        filename: PathBuf,
    },
    /// Copy an image into a new one of another format, skipping unallocated and zero areas.
    Convert {
        /// Format of the source (probed when not given).
        #[arg(short = 'f', long = "format", value_parser = parse_format)]
        format: Option<Format>,
        /// Format of the destination.
        #[arg(short = 'O', long = "output-format", default_value = "raw", value_parser = parse_format)]
        output_format: Format,
        /// Destination format options, comma separated: cluster_size=SIZE.
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Show a progress bar even when stderr is not a terminal.
        #[arg(short = 'p', long)]
        progress: bool,
        /// No progress bar.
        #[arg(short = 'q', long)]
        quiet: bool,
        source: PathBuf,
        destination: PathBuf,
    },
    /// Check an image's metadata for consistency (fails on corruption; leaks are reported).
    Check {
        /// Format of the image (probed when not given).
        #[arg(short = 'f', long = "format", value_parser = parse_format)]
        format: Option<Format>,
        /// Repair: `leaks` frees leaked clusters (corruptions are never repaired here).
        #[arg(short = 'r', long = "repair", value_parser = ["leaks"])]
        repair: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Output format, as qemu-img: human or json.
        #[arg(long, value_parser = ["human", "json"])]
        output: Option<String>,
        filename: PathBuf,
    },
    /// Grow an image's virtual size: SIZE, or +SIZE to add to it. Shrinking is refused.
    Resize {
        /// Format of the image (probed when not given).
        #[arg(short = 'f', long = "format", value_parser = parse_format)]
        format: Option<Format>,
        filename: PathBuf,
        /// New size (10G) or increment (+1G).
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse().map_err(|e: block::UnknownFormat| e.to_string())
}

/// Parses sizes like `10G`, `512M`, `1.5G`, `4096`, `64k`, `2MiB` (binary units, as qemu-img).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let digits_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => bail!("invalid size {s:?}: unknown unit {unit:?} (use k, M, G, T, P, E)"),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() && frac.is_empty() {
        bail!("invalid size {s:?}: no number");
    }
    if frac.contains('.') || frac.len() > 18 {
        bail!("invalid size {s:?}");
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().with_context(|| format!("invalid size {s:?}"))?
    };
    let frac_val: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse()
            .with_context(|| format!("invalid size {s:?}"))?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let bytes = (int << shift) + ((frac_val << shift) / scale);
    u64::try_from(bytes).map_err(|_| anyhow::anyhow!("size {s:?} is too large"))
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000 ", " ")
    }
}

/// Parses qemu-img style `-o key=value,...` options; only cluster_size is supported.
fn parse_cluster_size(options: &[String]) -> Result<Option<u64>> {
    let mut cluster_size = None;
    for opt in options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        match opt.split_once('=') {
            Some(("cluster_size", v)) => cluster_size = Some(parse_size(v)?),
            _ => bail!("unsupported option {opt:?} (supported: cluster_size=SIZE)"),
        }
    }
    Ok(cluster_size)
}

fn print_info(info: &block::ImageInfo) {
    println!("image: {}", info.filename.display());
    println!("file format: {}", info.format);
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    println!("disk size: {}", human_size(info.actual_size));
    if let Some(cs) = info.cluster_size {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = &info.backing_file {
        println!("backing file: {b}");
    }
    if let Some(f) = &info.backing_format {
        println!("backing file format: {f}");
    }
    if let Some(v) = info.qcow2_version {
        println!("Format specific information:");
        println!("    compat: {}", if v >= 3 { "1.1" } else { "0.10" });
        if let Some(bits) = info.refcount_bits {
            println!("    refcount bits: {bits}");
        }
        println!("    dirty: {}", info.dirty);
        println!("    corrupt: {}", info.corrupt);
    }
}

fn wants_json(json: bool, output: &Option<String>) -> bool {
    json || output.as_deref() == Some("json")
}

/// Runs one `vessel img` subcommand.
/// Runs an `img` subcommand; its exit status (`check`'s are qemu-img's: 2 when the
/// image is corrupt, 3 when it leaks clusters and nothing worse).
pub fn run(cmd: ImgCommand) -> Result<i32> {
    match cmd {
        ImgCommand::Create {
            format,
            backing,
            backing_format,
            options,
            quiet,
            filename,
            size,
        } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            let cluster_size = parse_cluster_size(&options)?;
            if backing_format.is_some() && backing.is_none() {
                bail!("-F needs a backing file (-b)");
            }
            let opts = CreateOptions {
                format,
                size,
                backing: backing.clone().map(|b| (b, backing_format)),
                cluster_size,
            };
            block::ops::create_with(&filename, &opts)
                .with_context(|| format!("creating {}", filename.display()))?;
            if !quiet {
                let info = block::info(&filename, Some(format))?;
                let mut line = format!(
                    "Formatted '{}', fmt={format} size={}",
                    filename.display(),
                    info.virtual_size
                );
                if let Some(b) = backing {
                    line.push_str(&format!(" backing_file={b}"));
                }
                println!("{line}");
            }
        }
        ImgCommand::Info {
            format,
            json,
            output,
            backing_chain,
            filename,
        } => {
            let chain = if backing_chain {
                block::ops::info_chain(&filename, format)
            } else {
                block::info(&filename, format).map(|i| vec![i])
            }
            .with_context(|| format!("reading {}", filename.display()))?;
            if wants_json(json, &output) {
                if backing_chain {
                    println!("{}", serde_json::to_string_pretty(&chain)?);
                } else if let Some(info) = chain.first() {
                    println!("{}", serde_json::to_string_pretty(info)?);
                }
            } else {
                for (n, info) in chain.iter().enumerate() {
                    if n > 0 {
                        println!();
                    }
                    print_info(info);
                }
            }
        }
        ImgCommand::Convert {
            format,
            output_format,
            options,
            progress,
            quiet,
            source,
            destination,
        } => {
            let bar = if !quiet && (progress || std::io::stderr().is_terminal()) {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                Some(bar)
            } else {
                None
            };
            let mut report = |done: u64, total: u64| {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                }
            };
            let opts = CreateOptions {
                format: output_format,
                size: None,
                backing: None,
                cluster_size: parse_cluster_size(&options)?,
            };
            block::ops::convert_with(&source, format, &destination, &opts, &mut report)
                .with_context(|| {
                    format!(
                        "converting {} to {}",
                        source.display(),
                        destination.display()
                    )
                })?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
        }
        ImgCommand::Check {
            format,
            repair,
            json,
            output,
            filename,
        } => {
            let report = block::ops::check_with(&filename, format, repair.is_some())
                .with_context(|| format!("checking {}", filename.display()))?;
            if wants_json(json, &output) {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                match &report.qcow2 {
                    None => println!(
                        "{}: {} images have no metadata to check.",
                        filename.display(),
                        report.format
                    ),
                    Some(r) => {
                        for m in &r.messages {
                            println!("{m}");
                        }
                        if r.leaks_fixed > 0 {
                            println!("Leaked clusters repaired: {}", r.leaks_fixed);
                        }
                        if r.flags_fixed > 0 {
                            println!("COPIED flags repaired: {}", r.flags_fixed);
                        }
                        if r.corruptions == 0 && r.leaks == r.leaks_fixed {
                            println!("No errors were found on the image.");
                        }
                        if r.leaks > r.leaks_fixed {
                            println!(
                                "{} leaked clusters were found on the image.\n\
                                 This means waste of disk space, but no harm to data.",
                                r.leaks
                            );
                        }
                        if r.corruptions > 0 {
                            println!("{} errors were found on the image.", r.corruptions);
                        }
                        if r.total_clusters > 0 {
                            println!(
                                "{}/{} = {:.2}% allocated",
                                r.allocated_clusters,
                                r.total_clusters,
                                r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
                            );
                        }
                        println!("Image end offset: {}", r.image_end_offset);
                    }
                }
            }
            if !report.is_consistent() {
                eprintln!(
                    "vessel: {} is corrupt: repair it with `qemu-img check -r all`",
                    filename.display()
                );
                return Ok(2);
            }
            if report
                .qcow2
                .as_ref()
                .is_some_and(|r| r.leaks > r.leaks_fixed)
            {
                return Ok(3);
            }
        }
        ImgCommand::Resize {
            format,
            filename,
            size,
        } => {
            let new_size = if let Some(inc) = size.strip_prefix('+') {
                let cur = block::info(&filename, format)?.virtual_size;
                cur.checked_add(parse_size(inc)?)
                    .context("new size overflows")?
            } else if size.starts_with('-') {
                bail!("shrinking is not supported");
            } else {
                parse_size(&size)?
            };
            block::resize(&filename, format, new_size)
                .with_context(|| format!("resizing {}", filename.display()))?;
            println!("Image resized.");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, want) in [
            ("4096", 4096u64),
            ("64k", 64 << 10),
            ("512M", 512 << 20),
            ("10G", 10 << 30),
            ("1.5G", 3 << 29),
            ("2MiB", 2 << 20),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size(s).unwrap(), want, "{s}");
        }
        for bad in ["", "G", "10X", "1.2.3", "99999999999E", "-1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(1536), "1.500 KiB");
    }
}
