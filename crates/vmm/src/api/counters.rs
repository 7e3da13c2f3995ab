//! `GET /vessel/counters`: what the VM's disks and interfaces have served so far, as
//! cumulative counters (the manager turns them into rates for its dashboard and exports
//! them on its Prometheus endpoint). Before boot and after the guest ends there are no
//! devices to count, and the answer is an empty object.

use serde_json::{json, Map, Value};

use crate::runtime::DeviceTotals;

/// The totals as `{"block": {"read_bytes": N, …}, "net": {"rx_bytes_count": N, …}}`.
pub fn to_json(totals: Option<&DeviceTotals>) -> Value {
    let mut out = Map::new();
    for ((group, name), v) in totals.into_iter().flatten() {
        let g = out
            .entry(group.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = g {
            m.insert(name.to_string(), json!(v));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_counters() {
        let mut t = DeviceTotals::new();
        t.insert(("block", "read_bytes"), 4096);
        t.insert(("net", "tx_bytes_count"), 60);
        let v = to_json(Some(&t));
        assert_eq!(v["block"]["read_bytes"], 4096);
        assert_eq!(v["net"]["tx_bytes_count"], 60);
        assert_eq!(to_json(None), json!({}));
    }
}
