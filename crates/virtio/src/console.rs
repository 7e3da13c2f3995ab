//! virtio-console, single port: a second console besides the UART (hvc0 in the guest).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::queue::{gather, scatter, Chain};
use crate::{device_type, read_config_bytes, DeviceError, QueueOutcome, VirtioDevice};

pub const RECEIVE_QUEUE: usize = 0;
pub const TRANSMIT_QUEUE: usize = 1;
const MAX_TX: u64 = 64 << 10;

/// Host-to-guest bytes waiting for receive buffers.
pub type ConsoleInput = Arc<Mutex<VecDeque<u8>>>;

pub struct Console {
    out: Box<dyn Write + Send>,
    input: ConsoleInput,
    config: [u8; 12],
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        let mut config = [0u8; 12];
        config[0..2].copy_from_slice(&80u16.to_le_bytes());
        config[2..4].copy_from_slice(&25u16.to_le_bytes());
        Console {
            out,
            input: Arc::default(),
            config,
        }
    }

    /// Where to push host input; after pushing, process the receive queue.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceError> {
        let mut outcome = QueueOutcome::default();
        let size = queue.size();
        match index {
            TRANSMIT_QUEUE => {
                while let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let chain = Chain::collect(chain, size, mem)?;
                    let bytes = gather(mem, &chain.readable, MAX_TX)?;
                    let _ = self.out.write_all(&bytes);
                    let _ = self.out.flush();
                    queue
                        .add_used(mem, chain.head, 0)
                        .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
                    outcome.used = true;
                }
            }
            RECEIVE_QUEUE => {
                let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
                while !input.is_empty() {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let chain = Chain::collect(chain, size, mem)?;
                    let room: usize = chain.writable.iter().map(|d| d.len() as usize).sum();
                    let n = room.min(input.len());
                    let bytes: Vec<u8> = input.drain(..n).collect();
                    scatter(mem, &chain.writable, &bytes)?;
                    queue
                        .add_used(mem, chain.head, n as u32)
                        .map_err(|_| DeviceError::BadRequest("cannot add to the used ring"))?;
                    outcome.used = true;
                }
            }
            _ => {}
        }
        Ok(outcome)
    }
}
