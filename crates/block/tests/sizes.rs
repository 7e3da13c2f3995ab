//! Sizes near u64::MAX are refused with typed errors, never wrapped (issue 22: a 2^64-1
//! byte qcow2 used to be created with a virtual size of 0).

mod common;

use block::Format;
use common::*;

#[test]
fn create_refuses_sizes_that_overflow() {
    let dir = TempDir::new("sizes");
    for size in [u64::MAX, u64::MAX - 510, 1u64 << 62] {
        let p = dir.path("big.qcow2");
        let e = block::create(&p, Format::Qcow2, Some(size), None).unwrap_err();
        assert!(
            matches!(
                e,
                block::ops::CreateError::InitQcow2 {
                    source: block::Qcow2Error::SizeTooLarge(_),
                    ..
                }
            ),
            "{size}: {e:?}"
        );
        let _ = std::fs::remove_file(&p);
    }
}
