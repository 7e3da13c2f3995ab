//! virsh's argument shapes: every argument of a verb may also be given by its name
//! (`vessel domstate --domain web`, `vol-info --pool default disk.qcow2`,
//! `attach-disk --domain web --source /x.img --target vdb`), as `--name VALUE` or
//! `--name=VALUE`, in any order. Scripts written for virsh use both forms; clap knows only
//! positions, so the named ones are moved to their positions before clap parses.

use std::ffi::OsString;

/// The names virsh gives an argument that Vessel's verbs call otherwise, each with the
/// positional arguments (clap ids) it may stand for, the first one a verb has wins.
const ALIASES: &[(&str, &[&str])] = &[
    ("domain", &["name"]),
    ("network", &["name"]),
    ("pool", &["pool", "name"]),
    ("vol", &["vol", "name"]),
    // snapshot-create-as DOMAIN NAME: virsh's --name is the snapshot's.
    ("name", &["snapshot", "name"]),
    ("snapshotname", &["snapshot"]),
    ("desturi", &["dest"]),
    ("capacity", &["size"]),
];

/// The verb's positional ids in order, and its long options with whether each takes a
/// value.
struct Shape {
    positionals: Vec<String>,
    options: Vec<(String, bool)>,
}

fn shape(cmd: &clap::Command) -> Shape {
    let mut positionals: Vec<(usize, String)> = Vec::new();
    let mut options = Vec::new();
    for a in cmd.get_arguments() {
        if a.is_positional() {
            positionals.push((a.get_index().unwrap_or(usize::MAX), a.get_id().to_string()));
        } else if let Some(long) = a.get_long() {
            let takes = a.get_action().takes_values();
            options.push((long.to_string(), takes));
            for alias in a.get_all_aliases().unwrap_or_default() {
                options.push((alias.to_string(), takes));
            }
        }
    }
    positionals.sort();
    Shape {
        positionals: positionals.into_iter().map(|(_, id)| id).collect(),
        options,
    }
}

/// `args` (the program name first) with the named forms of positional arguments moved
/// to their positions; anything else is left as it is for clap to judge.
pub fn positional(cli: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    let text: Vec<Option<&str>> = args.iter().map(|a| a.to_str()).collect();
    // The verb: the first word that is not a global option or its value.
    let globals = shape(cli);
    let mut i = 1;
    while i < args.len() {
        let Some(a) = text[i] else { return args };
        match a.strip_prefix("--") {
            Some(opt) if !opt.is_empty() => {
                let (name, inline) = opt.split_once('=').map_or((opt, false), |(n, _)| (n, true));
                let takes = globals.options.iter().any(|(o, t)| o == name && *t);
                i += if takes && !inline { 2 } else { 1 };
            }
            _ if a.starts_with('-') && a.len() > 1 => i += 1,
            _ => break,
        }
    }
    let Some(verb) = text.get(i).copied().flatten() else {
        return args;
    };
    // The VMM and the daemon take flags only, and start fast: nothing to move there.
    let named_any = args[i + 1..]
        .iter()
        .any(|a| a.to_str().is_some_and(|a| a.starts_with("--")));
    if !named_any || matches!(verb, "run" | "daemon" | "img" | "rebase-snap") {
        return args;
    }
    // Built, so every positional argument has its index.
    let mut built = cli.clone();
    built.build();
    let Some(sub) = built.find_subcommand(verb) else {
        return args;
    };
    let sh = shape(sub);
    if sh.positionals.is_empty() {
        return args;
    }
    let is_option = |n: &str| {
        sh.options.iter().any(|(o, _)| o == n) || globals.options.iter().any(|(o, _)| o == n)
    };
    let takes_value = |n: &str| {
        sh.options
            .iter()
            .chain(globals.options.iter())
            .any(|(o, t)| o == n && *t)
    };
    let slot_of = |n: &str| -> Option<usize> {
        if is_option(n) {
            return None;
        }
        let candidates: &[&str] = ALIASES
            .iter()
            .find(|(v, _)| *v == n)
            .map_or(&[][..], |(_, c)| c);
        candidates
            .iter()
            .copied()
            .chain(std::iter::once(n))
            .find_map(|c| sh.positionals.iter().position(|p| p == c))
    };
    let mut slots: Vec<Option<OsString>> = vec![None; sh.positionals.len()];
    let mut options: Vec<OsString> = Vec::new();
    let mut bare: Vec<OsString> = Vec::new();
    let mut named = false;
    let mut j = i + 1;
    while j < args.len() {
        let Some(a) = text[j] else { return args };
        if a == "--" {
            bare.extend(args[j + 1..].iter().cloned());
            break;
        }
        if let Some(opt) = a.strip_prefix("--") {
            let (name, inline) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (opt, None),
            };
            if let Some(k) = slot_of(name).filter(|k| slots[*k].is_none()) {
                let value = match inline {
                    Some(v) => OsString::from(v),
                    None => match args.get(j + 1) {
                        Some(v) => {
                            j += 1;
                            v.clone()
                        }
                        // `--domain` with nothing after it: clap says what is missing.
                        None => return args,
                    },
                };
                slots[k] = Some(value);
                named = true;
                j += 1;
                continue;
            }
            options.push(args[j].clone());
            if inline.is_none() && takes_value(name) {
                if let Some(v) = args.get(j + 1) {
                    options.push(v.clone());
                    j += 1;
                }
            }
        } else if a.starts_with('-') && a.len() > 1 {
            options.push(args[j].clone());
        } else {
            bare.push(args[j].clone());
        }
        j += 1;
    }
    if !named {
        return args;
    }
    // Bare values fill the slots no name filled, in order.
    let mut bare = bare.into_iter();
    for s in slots.iter_mut().filter(|s| s.is_none()) {
        match bare.next() {
            Some(v) => *s = Some(v),
            None => break,
        }
    }
    let mut out: Vec<OsString> = args[..=i].to_vec();
    out.extend(options);
    // A slot left empty before a filled one shifts the later values; clap then reports
    // the missing argument by its name.
    out.extend(slots.into_iter().flatten());
    out.extend(bare);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[arg(long, global = true)]
        socket: Option<String>,
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        Domstate {
            name: String,
            #[arg(long)]
            reason: bool,
        },
        AttachDisk {
            name: String,
            source: String,
            target: String,
            #[arg(long = "type")]
            device: Option<String>,
        },
        VolInfo {
            pool: String,
            name: String,
        },
        SnapshotCreateAs {
            name: String,
            snapshot: String,
            #[arg(long)]
            description: Option<String>,
        },
        List {
            #[arg(long)]
            name: bool,
        },
    }

    fn run(line: &str) -> Vec<String> {
        let args: Vec<OsString> = line.split(' ').map(OsString::from).collect();
        positional(&Cli::command(), args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn named_arguments_take_their_positions() {
        assert_eq!(
            run("vessel --socket /s domstate --domain web --reason"),
            ["vessel", "--socket", "/s", "domstate", "--reason", "web"]
        );
        assert_eq!(
            run("vessel domstate --domain=web"),
            ["vessel", "domstate", "web"]
        );
        // A mix: the named ones first, then bare values fill what is left, in order.
        assert_eq!(
            run("vessel attach-disk --target vdb web /x.img --type disk"),
            [
                "vessel",
                "attach-disk",
                "--type",
                "disk",
                "web",
                "/x.img",
                "vdb"
            ]
        );
        assert_eq!(
            run("vessel attach-disk --domain web --source /x.img --target vdb"),
            ["vessel", "attach-disk", "web", "/x.img", "vdb"]
        );
        // virsh's vol-info VOL --pool POOL.
        assert_eq!(
            run("vessel vol-info disk.qcow2 --pool default"),
            ["vessel", "vol-info", "default", "disk.qcow2"]
        );
        // snapshot-create-as: --name is the snapshot's, --domain the domain.
        assert_eq!(
            run("vessel snapshot-create-as --domain web --name s1 --description x"),
            [
                "vessel",
                "snapshot-create-as",
                "--description",
                "x",
                "web",
                "s1"
            ]
        );
    }

    #[test]
    fn real_options_and_plain_positions_are_left_alone() {
        for line in [
            "vessel domstate web --reason",
            "vessel list --name",
            "vessel attach-disk web /x.img vdb --type disk",
            "vessel vol-info default disk.qcow2",
            "vessel unknown-verb --domain web",
        ] {
            assert_eq!(run(line).join(" "), line);
        }
    }
}
