//! Instruction-set extensions beyond SSE2 (run through `exec::hostexec`) and the XSAVE
//! state: results checked against values computed here on the host.

mod common;

use common::*;
use iced_x86::code_asm::*;
use x86emu::state::cr;
use x86emu::{NoDevices, RunExit};

fn avx_guest() -> Guest {
    let mut g = Guest::new();
    let s = g.cpu.state_mut();
    s.cr4 |= cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT | cr::CR4_OSXSAVE;
    s.xcr0 = 7;
    g
}

fn run(g: &mut Guest) {
    let r = g.cpu.run(&mut NoDevices, 10_000);
    assert_eq!(r, RunExit::Halted, "rip {:#x}", g.cpu.state().rip);
}

#[test]
fn vmovdqu_ymm_load_and_store() {
    let mut g = avx_guest();
    let src: Vec<u8> = (0u8..32).collect();
    g.load(DATA, &src);
    g.load_code(|a| {
        a.mov(rsi, DATA).unwrap();
        a.vmovdqu(ymm0, ymmword_ptr(rsi)).unwrap();
        a.vpaddb(ymm1, ymm0, ymm0).unwrap();
        a.vmovdqu(ymmword_ptr(rsi + 64), ymm1).unwrap();
        a.hlt().unwrap();
    });
    run(&mut g);
    let s = g.cpu.state();
    assert_eq!(s.fpu.xmm[0].to_le_bytes().to_vec(), src[..16].to_vec());
    assert_eq!(s.fpu.ymm_hi[0].to_le_bytes().to_vec(), src[16..].to_vec());
    let mut out = [0u8; 32];
    assert!(g.cpu.ram().read(DATA + 64, &mut out));
    let want: Vec<u8> = src.iter().map(|b| b * 2).collect();
    assert_eq!(out.to_vec(), want);
}

#[test]
fn pcmpistri_and_pcmpestri_set_ecx_and_flags() {
    use std::arch::x86_64::*;
    let hay = *b"hello, world!\0xyzabcdefghijklmn";
    let set = *b"!,\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
    // SAFETY: SSE4.2 is checked before use.
    let want = unsafe {
        assert!(std::arch::is_x86_feature_detected!("sse4.2"));
        let a = _mm_loadu_si128(set.as_ptr().cast());
        let b = _mm_loadu_si128(hay.as_ptr().cast());
        _mm_cmpistri::<{ _SIDD_CMP_EQUAL_ANY }>(a, b)
    };
    let mut g = avx_guest();
    g.load(DATA, &set);
    g.load(DATA + 0x100, &hay);
    g.load_code(|a| {
        a.mov(rsi, DATA).unwrap();
        a.movdqu(xmm1, xmmword_ptr(rsi)).unwrap();
        a.mov(ecx, 0x1234_5678).unwrap();
        a.pcmpistri(xmm1, xmmword_ptr(rsi + 0x100), 0).unwrap();
        a.mov(r8, rcx).unwrap();
        a.mov(eax, 3).unwrap();
        a.mov(edx, 16).unwrap();
        a.pcmpestri(xmm1, xmmword_ptr(rsi + 0x100), 0).unwrap();
        a.hlt().unwrap();
    });
    run(&mut g);
    let s = g.cpu.state();
    assert_eq!(s.gpr[8] as i32, want, "PCMPISTRI index in ECX");
    assert_eq!(
        s.gpr[1], 5,
        "PCMPESTRI with the set's length 3 finds ',' at 5"
    );
}

#[test]
fn avx2_byte_search_like_glibc_memchr() {
    let mut g = avx_guest();
    let mut hay = [b'a'; 64];
    hay[37] = b'.';
    hay[50] = b'.';
    g.load(DATA, &hay);
    g.load_code(|a| {
        a.mov(esi, u32::from(b'.')).unwrap();
        a.vmovd(xmm0, esi).unwrap();
        a.vpbroadcastb(ymm0, xmm0).unwrap();
        a.mov(rdi, DATA).unwrap();
        a.mov(edx, 32).unwrap();
        a.vpcmpeqb(ymm1, ymm0, ymmword_ptr(rdi + rdx)).unwrap();
        a.vpmovmskb(ecx, ymm1).unwrap();
        a.tzcnt(r8d, ecx).unwrap();
        a.lzcnt(r9d, ecx).unwrap();
        a.blsmsk(r10d, ecx).unwrap();
        a.andn(r11d, ecx, r10d).unwrap();
        a.mov(eax, 5).unwrap();
        a.bzhi(r12d, ecx, eax).unwrap();
        a.shlx(r13d, ecx, eax).unwrap();
        a.vzeroupper().unwrap();
        a.hlt().unwrap();
    });
    run(&mut g);
    let s = g.cpu.state();
    let mask: u32 = (1 << 5) | (1 << 18);
    assert_eq!(s.gpr[1], u64::from(mask), "VPMOVMSKB");
    assert_eq!(s.gpr[8], 5, "TZCNT");
    assert_eq!(s.gpr[9], u64::from(mask.leading_zeros()), "LZCNT");
    assert_eq!(s.gpr[10], u64::from(mask ^ (mask - 1)), "BLSMSK");
    assert_eq!(s.gpr[11], u64::from(!mask & (mask ^ (mask - 1))), "ANDN");
    assert_eq!(s.gpr[12], u64::from(mask & 31), "BZHI");
    assert_eq!(s.gpr[13], u64::from(mask << 5), "SHLX");
    assert_eq!(s.fpu.ymm_hi[1], 0, "VZEROUPPER");
}

#[test]
fn xsavec_xrstor_round_trip_keeps_every_register() {
    for (compact, seed) in [(true, 1u64), (false, 2), (true, 3), (false, 4)] {
        let mut g = avx_guest();
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        {
            let s = g.cpu.state_mut();
            for i in 0..16 {
                s.fpu.xmm[i] = (u128::from(next()) << 64) | u128::from(next());
                s.fpu.ymm_hi[i] = (u128::from(next()) << 64) | u128::from(next());
            }
            s.fpu.mxcsr = 0x1f80 | 0x6000;
            s.fpu.fcw = 0x27f;
            s.fpu.ftw = 0x81;
            s.fpu.fsw = 0x3800;
            s.fpu.st[0] = 0x3fff_8000_0000_0000_0000;
            s.fpu.st[1] = 0x4000_c000_0000_0000_0000;
        }
        let before = g.cpu.state().fpu;
        g.load_code(|a| {
            a.mov(rdi, DATA).unwrap();
            a.mov(eax, 7).unwrap();
            a.xor(edx, edx).unwrap();
            if compact {
                a.xsavec64(ptr(rdi)).unwrap();
            } else {
                a.xsave64(ptr(rdi)).unwrap();
            }
            a.vzeroall().unwrap();
            a.fninit().unwrap();
            a.xrstor64(ptr(rdi)).unwrap();
            a.hlt().unwrap();
        });
        run(&mut g);
        let after = g.cpu.state().fpu;
        assert_eq!(after.xmm, before.xmm, "XMM, compact {compact}");
        assert_eq!(
            after.ymm_hi, before.ymm_hi,
            "YMM upper halves, compact {compact}"
        );
        assert_eq!(after.mxcsr, before.mxcsr, "MXCSR");
        assert_eq!(
            (after.fcw, after.fsw, after.ftw, after.st),
            (before.fcw, before.fsw, before.ftw, before.st),
            "x87"
        );
    }
}

#[test]
fn avx2_gathers_follow_the_mask_and_clear_it() {
    use std::arch::x86_64::*;
    let table: Vec<i32> = (0..64).map(|i| i * 3 - 50).collect();
    let idx: [i32; 8] = [5, 0, 63, 7, 1, 2, 40, 9];
    let mask: [i32; 8] = [-1, -1, 0, -1, -1, 0, -1, -1];
    let src: [i32; 8] = [111; 8];
    // SAFETY: AVX2 is checked first; the indices stay inside `table`.
    let want: [i32; 8] = unsafe {
        assert!(std::arch::is_x86_feature_detected!("avx2"));
        let r = _mm256_mask_i32gather_epi32::<4>(
            _mm256_loadu_si256(src.as_ptr().cast()),
            table.as_ptr(),
            _mm256_loadu_si256(idx.as_ptr().cast()),
            _mm256_loadu_si256(mask.as_ptr().cast()),
        );
        std::mem::transmute(r)
    };
    let mut g = avx_guest();
    let bytes = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    g.load(DATA, &bytes(&table));
    g.load(DATA + 0x400, &bytes(&idx));
    g.load(DATA + 0x420, &bytes(&mask));
    g.load(DATA + 0x440, &bytes(&src));
    g.load_code(|a| {
        a.mov(rsi, DATA).unwrap();
        a.vmovdqu(ymm1, ymmword_ptr(rsi + 0x400)).unwrap();
        a.vmovdqu(ymm2, ymmword_ptr(rsi + 0x420)).unwrap();
        a.vmovdqu(ymm0, ymmword_ptr(rsi + 0x440)).unwrap();
        a.vpgatherdd_3(ymm0, ptr(rsi + ymm1 * 4), ymm2).unwrap();
        a.vmovdqu(ymmword_ptr(rsi + 0x480), ymm0).unwrap();
        a.vmovdqu(ymmword_ptr(rsi + 0x4a0), ymm2).unwrap();
        a.hlt().unwrap();
    });
    run(&mut g);
    let mut out = [0u8; 64];
    assert!(g.cpu.ram().read(DATA + 0x480, &mut out));
    let got: Vec<i32> = out[..32]
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, want.to_vec(), "VPGATHERDD matches the host");
    assert!(out[32..].iter().all(|&b| b == 0), "the mask is cleared");
}

#[test]
fn rdpid_reads_tsc_aux_and_clflushopt_runs() {
    let mut g = avx_guest();
    g.load_code(|a| {
        a.mov(ecx, 0xc000_0103u32).unwrap();
        a.mov(eax, 0x2a).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.mov(rbx, u64::MAX).unwrap();
        a.rdpid(rbx).unwrap();
        a.mov(rsi, DATA).unwrap();
        a.clflushopt(byte_ptr(rsi)).unwrap();
        a.hlt().unwrap();
    });
    run(&mut g);
    assert_eq!(g.cpu.state().gpr[3], 0x2a, "RDPID returns IA32_TSC_AUX");
}
