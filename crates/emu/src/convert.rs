//! Between the seam's neutral register types and x86emu's CPU state.

use hypervisor::regs::FxsaveFields;
use hypervisor::{DescriptorTable, FpuState, Regs, Segment, Sregs};
use x86emu::{CpuState, Seg};

fn seg_to_emu(s: &Segment) -> x86emu::Segment {
    let mut attr = u16::from(s.type_ & 0xf)
        | (u16::from(s.s) << 4)
        | (u16::from(s.dpl & 3) << 5)
        | (u16::from(s.present) << 7)
        | (u16::from(s.avl) << 12)
        | (u16::from(s.l) << 13)
        | (u16::from(s.db) << 14)
        | (u16::from(s.g) << 15);
    if s.unusable {
        attr &= !x86emu::Segment::ATTR_P;
    }
    x86emu::Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        attr,
    }
}

fn seg_from_emu(s: &x86emu::Segment) -> Segment {
    let a = s.attr;
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (a & 0xf) as u8,
        s: a & (1 << 4) != 0,
        dpl: ((a >> 5) & 3) as u8,
        present: a & (1 << 7) != 0,
        avl: a & (1 << 12) != 0,
        l: a & (1 << 13) != 0,
        db: a & (1 << 14) != 0,
        g: a & (1 << 15) != 0,
        unusable: a & (1 << 7) == 0,
    }
}

/// GPR order in x86emu: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
pub fn regs_from_emu(s: &CpuState) -> Regs {
    let g = &s.gpr;
    Regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: s.rip,
        rflags: s.rflags,
    }
}

pub fn regs_into_emu(r: &Regs, s: &mut CpuState) {
    s.gpr = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    s.rip = r.rip;
    s.rflags = r.rflags | 2;
}

pub fn sregs_from_emu(s: &CpuState) -> Sregs {
    let seg = |x: Seg| seg_from_emu(&s.seg[x as usize]);
    Sregs {
        cs: seg(Seg::Cs),
        ds: seg(Seg::Ds),
        es: seg(Seg::Es),
        fs: seg(Seg::Fs),
        gs: seg(Seg::Gs),
        ss: seg(Seg::Ss),
        tr: seg_from_emu(&s.tr),
        ldt: seg_from_emu(&s.ldtr),
        gdt: DescriptorTable {
            base: s.gdtr.base,
            limit: s.gdtr.limit,
        },
        idt: DescriptorTable {
            base: s.idtr.base,
            limit: s.idtr.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.msr.apic_base,
    }
}

pub fn sregs_into_emu(r: &Sregs, s: &mut CpuState) {
    for (x, v) in [
        (Seg::Cs, &r.cs),
        (Seg::Ds, &r.ds),
        (Seg::Es, &r.es),
        (Seg::Fs, &r.fs),
        (Seg::Gs, &r.gs),
        (Seg::Ss, &r.ss),
    ] {
        s.seg[x as usize] = seg_to_emu(v);
    }
    s.tr = seg_to_emu(&r.tr);
    s.ldtr = seg_to_emu(&r.ldt);
    s.gdtr = x86emu::DescriptorTable {
        base: r.gdt.base,
        limit: r.gdt.limit,
    };
    s.idtr = x86emu::DescriptorTable {
        base: r.idt.base,
        limit: r.idt.limit,
    };
    s.cr0 = r.cr0;
    s.cr2 = r.cr2;
    s.cr3 = r.cr3;
    s.cr4 = r.cr4;
    s.cr8 = r.cr8;
    s.efer = r.efer;
    s.msr.apic_base = r.apic_base;
}

pub fn fpu_from_emu(f: &x86emu::FpuState) -> FpuState {
    FpuState::from_fields(&FxsaveFields {
        fcw: f.fcw,
        fsw: f.fsw,
        ftw: f.ftw,
        fop: f.fop,
        fip: f.fip,
        fdp: f.fdp,
        mxcsr: f.mxcsr,
        st: f.st.map(u128::to_le_bytes),
        xmm: f.xmm.map(u128::to_le_bytes),
    })
}

pub fn fpu_into_emu(f: &FpuState, out: &mut x86emu::FpuState) {
    let x = f.fields();
    out.fcw = x.fcw;
    out.fsw = x.fsw;
    out.ftw = x.ftw;
    out.fop = x.fop;
    out.fip = x.fip;
    out.fdp = x.fdp;
    out.mxcsr = x.mxcsr;
    out.st = x.st.map(u128::from_le_bytes);
    out.xmm = x.xmm.map(u128::from_le_bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let mut s = CpuState::reset();
        let r = Regs {
            rax: 1,
            rbx: 2,
            rsi: 0x7000,
            r15: 15,
            rip: 0x100_0200,
            rflags: 2,
            ..Regs::default()
        };
        regs_into_emu(&r, &mut s);
        assert_eq!(regs_from_emu(&s), r);
        let sr = Sregs {
            cs: Segment::code64(0x10),
            ds: Segment::data(0x18),
            es: Segment::data(0x18),
            fs: Segment::data(0x18),
            gs: Segment::data(0x18),
            ss: Segment::data(0x18),
            tr: Segment::tss64(0x20, 0, 0x67),
            ldt: Segment {
                type_: 2,
                present: true,
                ..Segment::default()
            },
            cr0: 0x8000_0031,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            ..Sregs::default()
        };
        sregs_into_emu(&sr, &mut s);
        assert_eq!(sregs_from_emu(&s), sr);
        let mut f = FpuState::default();
        f.fxsave[160] = 0xaa;
        fpu_into_emu(&f, &mut s.fpu);
        assert_eq!(fpu_from_emu(&s.fpu), f);
    }
}
