//! Conversions between the neutral register types and KVM's structs.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::regs::{DescriptorTable, Regs, Segment, Sregs};

pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

/// Apply neutral sregs over KVM's current ones (keeps the interrupt bitmap KVM owns).
pub fn sregs_into_kvm(s: &Sregs, k: &mut kvm_sregs) {
    k.cs = seg_to_kvm(&s.cs);
    k.ds = seg_to_kvm(&s.ds);
    k.es = seg_to_kvm(&s.es);
    k.fs = seg_to_kvm(&s.fs);
    k.gs = seg_to_kvm(&s.gs);
    k.ss = seg_to_kvm(&s.ss);
    k.tr = seg_to_kvm(&s.tr);
    k.ldt = seg_to_kvm(&s.ldt);
    k.gdt = dt_to_kvm(&s.gdt);
    k.idt = dt_to_kvm(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

pub fn sregs_from_kvm(k: &kvm_sregs) -> Sregs {
    Sregs {
        cs: seg_from_kvm(&k.cs),
        ds: seg_from_kvm(&k.ds),
        es: seg_from_kvm(&k.es),
        fs: seg_from_kvm(&k.fs),
        gs: seg_from_kvm(&k.gs),
        ss: seg_from_kvm(&k.ss),
        tr: seg_from_kvm(&k.tr),
        ldt: seg_from_kvm(&k.ldt),
        gdt: dt_from_kvm(&k.gdt),
        idt: dt_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        let r = Regs {
            rax: 1,
            r15: 15,
            rip: 0x100_0000,
            rflags: 2,
            ..Regs::default()
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
        let s = Sregs {
            cs: Segment::code64(0x10),
            ds: Segment::data(0x18),
            tr: Segment::tss64(0x20, 0x1000, 0x67),
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x27,
            },
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Sregs::default()
        };
        let mut k = kvm_sregs::default();
        sregs_into_kvm(&s, &mut k);
        assert_eq!(sregs_from_kvm(&k), s);
    }
}
