//! `PUT /migration/send`: live-migrate the running VM to a VMM started with
//! `vessel run --incoming URL` (Cloud Hypervisor's `vm.send-migration`, with its
//! `destination_url`; the limits as QEMU's `downtime-limit` and a round cap).

use std::time::Duration;

use serde::Deserialize;

use crate::migration::{Endpoint, Limits};

/// `PUT /migration/send` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSendParams {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub destination_url: String,
    /// The longest the guest may stay stopped, by the source's estimate (default 300).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Pre-copy rounds at most before stopping the guest anyway (default 30).
    #[serde(default)]
    pub max_rounds: Option<u32>,
}

impl MigrationSendParams {
    /// Where to and how, or why the request is refused.
    pub fn check(&self) -> Result<(Endpoint, Limits), String> {
        let to: Endpoint = self.destination_url.parse()?;
        let mut limits = Limits::default();
        if let Some(ms) = self.downtime_limit_ms {
            if ms == 0 || ms > 600_000 {
                return Err(format!("downtime_limit_ms {ms}: give 1 to 600000"));
            }
            limits.downtime_limit = Duration::from_millis(ms);
        }
        if let Some(n) = self.max_rounds {
            if n == 0 || n > 1000 {
                return Err(format!("max_rounds {n}: give 1 to 1000"));
            }
            limits.max_rounds = n;
        }
        Ok((to, limits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_checked() {
        let p: MigrationSendParams =
            serde_json::from_str(r#"{"destination_url": "unix:/tmp/d.sock"}"#).unwrap();
        assert_eq!(p.check().unwrap().1, Limits::default());
        let p: MigrationSendParams = serde_json::from_str(
            r#"{"destination_url": "tcp:127.0.0.1:7000", "downtime_limit_ms": 50, "max_rounds": 3}"#,
        )
        .unwrap();
        let (to, l) = p.check().unwrap();
        assert_eq!(to, Endpoint::Tcp("127.0.0.1:7000".into()));
        assert_eq!(l.downtime_limit, Duration::from_millis(50));
        assert_eq!(l.max_rounds, 3);
        for bad in [
            r#"{"destination_url": "file:/x"}"#,
            r#"{"destination_url": "unix:/x", "max_rounds": 0}"#,
            r#"{"destination_url": "unix:/x", "downtime_limit_ms": 0}"#,
        ] {
            let p: MigrationSendParams = serde_json::from_str(bad).unwrap();
            assert!(p.check().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<MigrationSendParams>(
            r#"{"destination_url": "unix:/x", "local": true}"#
        )
        .is_err());
    }
}
