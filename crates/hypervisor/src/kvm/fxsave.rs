//! The FXSAVE image inside KVM's XSAVE image (`kvm_xsave`, the standard, uncompacted
//! format): the first 512 bytes are the legacy area, in FXSAVE's layout, and the
//! header after them says which state components hold state (XSTATE_BV).

use kvm_bindings::kvm_xsave;

/// The legacy area's bytes the architecture defines; 464..512 are left to software.
const LEGACY: usize = 464;
/// XSTATE_BV, the header's first 8 bytes.
const XSTATE_BV: usize = 512;
/// The x87 and SSE components.
const X87_SSE: u64 = 0b11;

fn bytes(x: &kvm_xsave) -> Vec<u8> {
    x.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The FXSAVE image in `x`. A component its header does not mark is in its initial
/// state, whatever its bytes hold (the kernel fills them in; an older one may not).
pub(super) fn from_xsave(x: &kvm_xsave) -> [u8; 512] {
    let b = bytes(x);
    let mut out = [0u8; 512];
    out.copy_from_slice(&b[..512]);
    let mut bv = [0u8; 8];
    bv.copy_from_slice(&b[XSTATE_BV..XSTATE_BV + 8]);
    let bv = u64::from_le_bytes(bv);
    let init = crate::FpuState::default().fxsave;
    if bv & 1 == 0 {
        // x87: control, status and tag words, opcode and pointers; ST0-7.
        out[..24].copy_from_slice(&init[..24]);
        out[32..160].fill(0);
    }
    if bv & 0b110 == 0 {
        // MXCSR belongs to SSE and AVX both.
        out[24..28].copy_from_slice(&init[24..28]);
    }
    if bv & 0b10 == 0 {
        out[160..416].fill(0);
    }
    out
}

/// Puts `fxsave` into `x` and marks the x87 and SSE components as holding it.
pub(super) fn into_xsave(fxsave: &[u8; 512], x: &mut kvm_xsave) {
    let mut b = bytes(x);
    b[..LEGACY].copy_from_slice(&fxsave[..LEGACY]);
    let mut bv = [0u8; 8];
    bv.copy_from_slice(&b[XSTATE_BV..XSTATE_BV + 8]);
    let bv = u64::from_le_bytes(bv) | X87_SSE;
    b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legacy_area_goes_in_with_x87_and_sse_marked_in_use() {
        let mut x = kvm_xsave::default();
        // A header that marks only AVX, and software bytes the kernel keeps.
        x.region[XSTATE_BV / 4] = 0b100;
        x.region[500 / 4] = 0xdead_beef;
        let mut fx = [0u8; 512];
        fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        fx[160..176].copy_from_slice(&[0x5a; 16]); // XMM0
        fx[500..504].copy_from_slice(&[1, 2, 3, 4]);
        into_xsave(&fx, &mut x);
        assert_eq!(x.region[XSTATE_BV / 4], 0b111);
        assert_eq!(x.region[500 / 4], 0xdead_beef, "software bytes kept");
        let back = from_xsave(&x);
        assert_eq!(back[..LEGACY], fx[..LEGACY]);
    }

    #[test]
    fn components_the_header_does_not_mark_read_as_initial() {
        let mut x = kvm_xsave::default();
        for w in &mut x.region[..LEGACY / 4] {
            *w = 0x1111_1111;
        }
        let fx = from_xsave(&x);
        assert_eq!(fx[..24], crate::FpuState::default().fxsave[..24]);
        assert_eq!(u32::from_le_bytes([fx[24], fx[25], fx[26], fx[27]]), 0x1f80);
        assert!(fx[32..416].iter().all(|&b| b == 0));
    }
}
