//! `fuzz-run`: runs fuzz targets on stable Rust, without libFuzzer. For each target it
//! runs the seeds, then mutates inputs from its corpus (seeds, inputs from `--corpus
//! DIR`, and inputs that gave a new outcome) for a bounded time, each input under
//! `catch_unwind`. A panic is a finding: the input is written to `--artifacts DIR` and
//! the run goes on; the exit status is 1 if any target panicked.
//!
//! `fuzz-run [--seconds N] [--seed S] [--corpus DIR] [--artifacts DIR] TARGET…|all`
//! `fuzz-run --list`

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fuzzing::mutate::{mutate, Rng};
use fuzzing::Target;

/// Corpus entries kept per target (a new one then replaces a random one).
const MAX_CORPUS: usize = 4096;

struct Opts {
    seconds: f64,
    seed: u64,
    corpus: Option<PathBuf>,
    artifacts: PathBuf,
    targets: Vec<Target>,
}

fn usage() -> ! {
    eprintln!(
        "usage: fuzz-run [--seconds N] [--seed S] [--corpus DIR] [--artifacts DIR] TARGET...|all\n       \
         fuzz-run --list"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        seconds: 10.0,
        seed: 0x7e55e1,
        corpus: None,
        artifacts: PathBuf::from("target/fuzz-artifacts"),
        targets: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--list" => {
                for t in fuzzing::all() {
                    println!("{}", t.name);
                }
                std::process::exit(0)
            }
            "--seconds" => o.seconds = value().parse().unwrap_or_else(|_| usage()),
            "--seed" => o.seed = value().parse().unwrap_or_else(|_| usage()),
            "--corpus" => o.corpus = Some(PathBuf::from(value())),
            "--artifacts" => o.artifacts = PathBuf::from(value()),
            "all" => o.targets.extend(fuzzing::all()),
            name => match fuzzing::by_name(name) {
                Some(t) => o.targets.push(t),
                None => {
                    eprintln!("fuzz-run: no target {name:?} (see --list)");
                    std::process::exit(2)
                }
            },
        }
    }
    if o.targets.is_empty() {
        usage()
    }
    o
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

thread_local! {
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs one input; `Err(message)` when it panicked.
fn run_one(t: &Target, input: &[u8]) -> Result<String, String> {
    PANIC.with(|p| *p.borrow_mut() = None);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(input))).map_err(|_| {
        PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "panic".into())
    })
}

struct Stats {
    execs: u64,
    cpu: Duration,
    corpus: usize,
    outcomes: usize,
    findings: usize,
}

fn fuzz(t: &Target, o: &Opts) -> Stats {
    let mut rng = Rng::new(o.seed ^ fnv(t.name.as_bytes()));
    let mut corpus: Vec<Vec<u8>> = (t.seeds)();
    let dir = o.corpus.as_ref().map(|c| c.join(t.name));
    if let Some(d) = &dir {
        let _ = std::fs::create_dir_all(d);
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    corpus.push(b);
                }
            }
        }
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut outcomes: HashSet<String> = HashSet::new();
    let mut panics = HashSet::new();
    let mut findings = 0;
    let mut execs = 0u64;
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(o.seconds);
    let mut queue: Vec<Vec<u8>> = corpus.clone();
    loop {
        let input = match queue.pop() {
            Some(i) => i,
            None => {
                if t0.elapsed() >= limit {
                    break;
                }
                let base = &corpus[rng.below(corpus.len())];
                mutate(base, &corpus, t.dictionary, t.max_len, &mut rng)
            }
        };
        execs += 1;
        match run_one(t, &input) {
            Ok(outcome) => {
                let mut new = false;
                for feature in outcome.lines() {
                    if !outcomes.contains(feature) {
                        outcomes.insert(feature.to_string());
                        new = true;
                    }
                }
                if new {
                    if let Some(d) = &dir {
                        let _ = std::fs::write(d.join(format!("{:016x}", fnv(&input))), &input);
                    }
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        let i = rng.below(corpus.len());
                        corpus[i] = input;
                    }
                }
            }
            Err(msg) => {
                let first = msg.lines().next().unwrap_or("").to_string();
                if panics.insert(first.clone()) {
                    findings += 1;
                    let _ = std::fs::create_dir_all(&o.artifacts);
                    let path = o
                        .artifacts
                        .join(format!("{}-crash-{:016x}", t.name, fnv(&input)));
                    let _ = std::fs::write(&path, &input);
                    eprintln!(
                        "fuzz-run: {}: PANIC: {}\n  input: {} ({} bytes)",
                        t.name,
                        msg,
                        path.display(),
                        input.len()
                    );
                }
            }
        }
    }
    Stats {
        execs,
        cpu: thread_cpu() - cpu0,
        corpus: corpus.len(),
        outcomes: outcomes.len(),
        findings,
    }
}

fn main() {
    let o = parse_args();
    std::panic::set_hook(Box::new(|info| {
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => s.to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default(),
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        PANIC.with(|p| *p.borrow_mut() = Some(format!("{msg}{at}")));
    }));
    let mut failed = false;
    for t in &o.targets {
        let s = fuzz(t, &o);
        println!(
            "fuzz-run: {}: {} inputs, {:.1} CPU-s, {} outcomes, corpus {}, {} panics",
            t.name,
            s.execs,
            s.cpu.as_secs_f64(),
            s.outcomes,
            s.corpus,
            s.findings
        );
        failed |= s.findings > 0;
    }
    std::process::exit(i32::from(failed))
}
