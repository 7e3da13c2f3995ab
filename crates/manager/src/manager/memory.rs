//! The guest's memory through its balloon: virsh's `setmem` and `dommemstat`.

use super::*;

impl Manager {
    /// virsh `setmem`: the guest's current memory, `kib` KiB of its maximum, through
    /// its balloon (the balloon's target is the rest). On a running domain the VMM's
    /// balloon is set (`live`); `config` changes the stored definition (its next
    /// start). Neither: the running VM if there is one, else the definition (virsh's
    /// `--current`).
    pub fn setmem(&self, name: &str, kib: u64, live: bool, config: bool) -> Result<()> {
        let l = self.domain_lock(name);
        let _g = lock(&l);
        let mut def = self.store.get_domain(name)?;
        let running = self.active_id(name).ok();
        let (live, config) = match (live, config) {
            (false, false) => (running.is_some(), running.is_none()),
            other => other,
        };
        let memory = def.vm.memory_mib;
        if def.vm.balloon.is_none() {
            return Err(Error::Unsupported(format!(
                "domain {name:?} has no balloon: setmem needs <memballoon model='virtio'> \
                 (vm.balloon); the maximum memory changes with the definition"
            )));
        }
        let mib = kib >> 10;
        if mib > memory {
            return Err(Error::invalid(
                "memory size",
                format!("{kib} KiB: cannot set memory higher than max memory ({memory} MiB)"),
            ));
        }
        if mib == 0 {
            return Err(Error::invalid("memory size", "at least 1 MiB"));
        }
        let amount = u32::try_from(memory - mib)
            .map_err(|_| Error::invalid("memory size", "a balloon that large"))?;
        if live {
            let (id, _) = running.ok_or_else(|| {
                Error::Conflict(format!("domain {name:?} is not running (use --config)"))
            })?;
            let run = self.run_dir(name);
            driver::of(id.driver).set_balloon(&run, amount, memory)?;
            tracing::info!(domain = name, amount_mib = amount, "balloon target set");
            // The running domain's definition as it is now (dumpxml's currentMemory).
            if let Some(mut now) = self.live_definition(name) {
                if let Some(b) = now.vm.balloon.as_mut() {
                    b.amount_mib = amount;
                }
                self.record_live(&run, &now);
            }
        }
        if config {
            if let Some(b) = def.vm.balloon.as_mut() {
                b.amount_mib = amount;
            }
            self.store.update_domain(&def)?;
        }
        Ok(())
    }

    /// virsh `dommemstat`: the running guest's memory as its balloon sees it, virsh's
    /// names and units.
    pub fn dommemstat(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let def = self.store.get_domain(name)?;
        let (id, _) = self.active_id(name)?;
        if def.vm.balloon.is_none() {
            return Err(Error::Unsupported(format!(
                "domain {name:?} has no balloon: dommemstat needs <memballoon model='virtio'>"
            )));
        }
        driver::of(id.driver).memory_stats(&self.run_dir(name), def.vm.memory_mib)
    }
}
