//! A small mutation engine: stacked byte-level edits, dictionary tokens and splices with
//! other corpus inputs, from a seeded xorshift generator (runs are reproducible).

/// xorshift64*.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Interesting numbers as text, for parsers of decimal fields.
const NUMBERS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1",
    b"255",
    b"65535",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1e308",
    b"-0",
    b"0x10",
];

/// Returns `input` changed by 1 to 8 stacked edits.
pub fn mutate(
    input: &[u8],
    corpus: &[Vec<u8>],
    dictionary: &[&[u8]],
    max_len: usize,
    rng: &mut Rng,
) -> Vec<u8> {
    let mut out = input.to_vec();
    let edits = 1 + rng.below(8);
    for _ in 0..edits {
        let len = out.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                out.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                out.drain(i..i + n);
            }
            4 if len > 0 => {
                // Repeat a range (nesting, long runs).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                let piece = out[i..i + n].to_vec();
                let times = 1 + rng.below(16);
                let at = rng.below(len + 1);
                for _ in 0..times {
                    out.splice(at..at, piece.iter().copied());
                }
            }
            5 | 6 if !dictionary.is_empty() => {
                let t = dictionary[rng.below(dictionary.len())];
                let i = rng.below(len + 1);
                if rng.below(2) == 0 || len == 0 {
                    out.splice(i..i, t.iter().copied());
                } else {
                    let n = rng.below((len - i).min(t.len() + 4) + 1);
                    out.splice(i..i + n, t.iter().copied());
                }
            }
            7 => {
                let t = NUMBERS[rng.below(NUMBERS.len())];
                // Over a run of digits if there is one, else anywhere.
                let digits: Vec<usize> = (0..len).filter(|&k| out[k].is_ascii_digit()).collect();
                if digits.is_empty() {
                    let i = rng.below(len + 1);
                    out.splice(i..i, t.iter().copied());
                } else {
                    let start = digits[rng.below(digits.len())];
                    let end = (start..len)
                        .find(|&k| !out[k].is_ascii_digit())
                        .unwrap_or(len);
                    out.splice(start..end, t.iter().copied());
                }
            }
            8 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            9 if len > 1 => {
                // Swap two bytes (reorders syntax).
                let (a, b) = (rng.below(len), rng.below(len));
                out.swap(a, b);
            }
            _ if len > 0 => {
                // An interesting byte: a boundary or a syntax character.
                let special = b"\x00\xff\x7f\x80<>/='\"&;{}[]:,\r\n \\%?";
                let i = rng.below(len);
                out[i] = special[rng.below(special.len())];
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out.truncate(max_len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_within_bounds_and_change_things() {
        let mut rng = Rng::new(7);
        let corpus = vec![b"<a b='c'>d</a>".to_vec(), Vec::new()];
        let mut changed = 0;
        for i in 0..20_000 {
            let input = &corpus[i % 2];
            let out = mutate(input, &corpus, &[b"<x>", b"&amp;"], 64, &mut rng);
            assert!(out.len() <= 64);
            changed += usize::from(out != *input);
        }
        assert!(changed > 15_000, "{changed}");
    }
}
