//! Bit packing of unsigned codes into `u32` words, least significant bits first, as one continuous bit
//! stream: value `j` occupies bits `[bits*j, bits*(j+1))` of the stream, and word `k` holds stream bits
//! `[32k, 32k+32)`. For 2/4/8 bits no value crosses a word; for 3 bits, 32 values fill exactly 3 words
//! (values 10 and 21 straddle two words), which is the layout of 3-bit GPTQ checkpoints.
use crate::{KernelError, Result};

/// Bit widths the packed formats support.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

pub fn check_bits(bits: u32) -> Result<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(KernelError::UnsupportedBits(bits))
    }
}

/// Number of `u32` words that `n` codes of `bits` bits occupy.
pub fn packed_words(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// Pack `codes` (each `< 2^bits`) into `packed_words(codes.len(), bits)` words.
pub fn pack_u32(codes: &[u8], bits: u32) -> Result<Vec<u32>> {
    check_bits(bits)?;
    let mut out = vec![0u32; packed_words(codes.len(), bits)];
    let limit = 1u32 << bits;
    for (j, &c) in codes.iter().enumerate() {
        if c as u32 >= limit {
            return Err(KernelError::CodeOutOfRange {
                index: j,
                code: c,
                bits,
            });
        }
        let bit = j * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        out[w] |= (c as u32) << off;
        if off + bits as usize > 32 {
            out[w + 1] |= (c as u32) >> (32 - off);
        }
    }
    Ok(out)
}

/// Unpack `n` codes of `bits` bits from `words` (inverse of [`pack_u32`]).
pub fn unpack_u32(words: &[u32], bits: u32, n: usize) -> Result<Vec<u8>> {
    check_bits(bits)?;
    if words.len() < packed_words(n, bits) {
        return Err(KernelError::Shape(format!(
            "{} words hold fewer than {n} codes of {bits} bits",
            words.len()
        )));
    }
    let mask = (1u64 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    for j in 0..n {
        let bit = j * bits as usize;
        let (w, off) = (bit / 32, bit % 32);
        let mut v = (words[w] as u64) >> off;
        if off + bits as usize > 32 {
            v |= (words[w + 1] as u64) << (32 - off);
        }
        out.push((v & mask) as u8);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_bit_layout_straddles_words() {
        // value 10 starts at bit 30: its low 2 bits end word 0, its high bit starts word 1
        let mut codes = vec![0u8; 32];
        codes[10] = 0b101;
        let w = pack_u32(&codes, 3).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], 0b01 << 30);
        assert_eq!(w[1], 0b1);
    }
}
