//! Every fuzz target runs its seeds and a burst of mutated inputs without a panic, and
//! its seeds reach more than one outcome (so the target really parses them). The long
//! runs are `fuzz-run` (scripts/test.sh runs each target for a bounded time).

use fuzzing::mutate::{mutate, Rng};

#[test]
fn every_target_survives_its_seeds_and_mutations() {
    let names: Vec<&str> = fuzzing::all().iter().map(|t| t.name).collect();
    for want in [
        "manager_api",
        "libvirt_xml",
        "libvirt_net_storage_xml",
        "firecracker_api",
        "x86emu_exec",
        "virtio_queues",
        "qcow2_ops",
    ] {
        assert!(names.contains(&want), "no target {want}: {names:?}");
    }
    for t in fuzzing::all() {
        let seeds = (t.seeds)();
        assert!(!seeds.is_empty(), "{}: no seeds", t.name);
        let mut outcomes = std::collections::BTreeSet::new();
        for s in &seeds {
            outcomes.insert((t.run)(s));
        }
        assert!(
            outcomes.len() > 1 || t.name == "x86emu_exec",
            "{}: every seed ends the same way: {outcomes:?}",
            t.name
        );
        let mut rng = Rng::new(42);
        let t0 = std::time::Instant::now();
        let mut n = 0;
        while t0.elapsed() < std::time::Duration::from_millis(1500) {
            let base = &seeds[rng.below(seeds.len())];
            let input = mutate(base, &seeds, t.dictionary, t.max_len, &mut rng);
            (t.run)(&input);
            n += 1;
        }
        assert!(n > 10, "{}: only {n} inputs", t.name);
    }
}

/// The API targets parse the seeds the way the servers do: a definition that names
/// existing files is accepted, a broken one refused with the API's error.
#[test]
fn api_targets_reach_the_parsers_behind_the_http_layer() {
    let manager = fuzzing::by_name("manager_api").unwrap();
    let seeds = (manager.seeds)();
    let outs: Vec<String> = seeds.iter().map(|s| (manager.run)(s)).collect();
    assert!(outs.iter().any(|o| o.contains("ok domain")), "{outs:?}");
    assert!(outs.iter().any(|o| o.contains("ok network")), "{outs:?}");
    let fc = fuzzing::by_name("firecracker_api").unwrap();
    let outs: Vec<String> = (fc.seeds)().iter().map(|s| (fc.run)(s)).collect();
    assert!(outs.iter().any(|o| o.contains("204")), "{outs:?}");
    assert!(outs.iter().any(|o| o.contains("400")), "{outs:?}");
    let xml = fuzzing::by_name("libvirt_xml").unwrap();
    let outs: Vec<String> = (xml.seeds)().iter().map(|s| (xml.run)(s)).collect();
    assert!(outs.iter().any(|o| o.starts_with("ok")), "{outs:?}");
    let other = fuzzing::by_name("libvirt_net_storage_xml").unwrap();
    let outs: Vec<String> = (other.seeds)().iter().map(|s| (other.run)(s)).collect();
    for want in ["net ok", "pool ok", "vol ok", "pool err"] {
        assert!(outs.iter().any(|o| o.contains(want)), "{want}: {outs:?}");
    }
}
