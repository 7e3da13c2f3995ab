//! The 8250/16550 UART (vm-superio's register model) on a bus, with its interrupt wired
//! through the accelerator seam.

use std::io::Write;
use std::sync::Arc;

use hypervisor::IrqChip;
use vm_superio::{serial::NoEvents, Serial, Trigger};

use crate::bus::BusDevice;

/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt as an edge on its GSI.
pub struct IrqTrigger {
    irq: Arc<dyn IrqChip>,
    gsi: u32,
}

impl IrqTrigger {
    pub fn new(irq: Arc<dyn IrqChip>, gsi: u32) -> Self {
        IrqTrigger { irq, gsi }
    }
}

impl Trigger for IrqTrigger {
    type E = hypervisor::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.irq.pulse_irq_line(self.gsi)
    }
}

/// Where guest console output goes; flushed on every byte so an interactive console and
/// a log file both see output as the guest writes it.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART's state in a snapshot: vm-superio's `SerialState`, with serde.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// A snapshot's UART state that vm-superio refused.
#[derive(Debug, thiserror::Error)]
#[error("serial port state: {0}")]
pub struct SerialStateError(String);

pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    pub fn new(trigger: IrqTrigger, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(trigger, out),
        }
    }

    /// A UART in the state a snapshot recorded (its registers and unread input);
    /// refused when the snapshot holds more input than the FIFO does.
    pub fn restored(
        trigger: IrqTrigger,
        out: SerialOut,
        state: &SerialSnapshot,
    ) -> Result<Self, SerialStateError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, trigger, NoEvents, out)
            .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(SerialDevice { uart })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queue host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(?e, "serial input dropped");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match u8::try_from(offset) {
            Ok(o) if o < 8 => self.uart.read(o),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if o >= 8 {
            return;
        }
        if let Err(e) = self.uart.write(o, v) {
            tracing::warn!(?e, "serial write failed");
        }
        if o == 0 {
            let _ = self.uart.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::testing::Lines;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input_with_interrupt() {
        let lines = Arc::new(Lines::default());
        let sink = Sink::default();
        let mut s = SerialDevice::new(
            IrqTrigger::new(lines.clone(), COM1_GSI),
            Box::new(sink.clone()),
        );
        for &b in b"hi" {
            s.write(0, &[b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // IER: received-data interrupt on; then input raises GSI 4 as an edge.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(&*lines.0.lock().unwrap(), &[(4, true), (4, false)]);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'x');
    }
}
