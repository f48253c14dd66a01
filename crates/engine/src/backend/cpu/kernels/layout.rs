//! How a weight matrix's bytes are arranged in memory: as in the file, or
//! rearranged once at load (in place, the same bytes) into panels for the
//! kernel that streams them, so that a batch of one reads each weight byte
//! once, in one sequential stream, with no shuffling in registers.

use super::Isa;
use crate::formats::quant::QType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each row's blocks contiguous, as in the file.
    Rows,
    /// Groups of 16 rows, block by block: the 16 rows' f16 scales (then
    /// their mins, or the K-quants' sub-block scales), then the quant
    /// bytes as 64-byte vectors whose 32-bit lane r holds 4 consecutive
    /// bytes of row r, so that one load is one VNNI multiply operand for
    /// all 16 rows (the 512-bit kernels), and each 32-byte half one AVX2
    /// operand for 8 rows (the 256-bit kernels). Signed 8-bit values are
    /// stored + 128: VNNI multiplies unsigned weights.
    Vnni16,
}

impl Layout {
    /// The layout the kernels of `isa` read `qtype` in.
    pub fn for_kernels(isa: Isa, qtype: QType) -> Layout {
        match (isa.vector(), qtype) {
            (Isa::Avx512Vnni | Isa::Avx2, q) if Layout::Vnni16.fits(q) => Layout::Vnni16,
            _ => Layout::Rows,
        }
    }

    pub const ALL: [Layout; 2] = [Layout::Rows, Layout::Vnni16];

    /// Whether `qtype`'s blocks can be arranged this way.
    pub fn fits(self, qtype: QType) -> bool {
        self != Layout::Vnni16 || matches!(qtype, QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 | QType::A8 | QType::Q4_K | QType::Q5_K | QType::Q6_K)
    }

    /// Rows per panel (rows past the last full panel stay as in the file).
    pub fn group(self) -> usize {
        match self {
            Layout::Rows => 1,
            Layout::Vnni16 => 16,
        }
    }

    /// Calls `f(src, dst, len)` for each run of bytes of row `r`'s block
    /// (`src` within the block) and where it lives in the panel's copy of
    /// that block (`dst` within `group()` blocks).
    fn runs(self, qtype: QType, r: usize, mut f: impl FnMut(usize, usize, usize)) {
        let bb = qtype.block_bytes();
        match self {
            Layout::Rows => f(0, r * bb, bb),
            Layout::Vnni16 if matches!(qtype, QType::Q4_K | QType::Q5_K) => {
                // A super-block: 16 f16 scales, 16 f16 mins, the 12 bytes of
                // 6-bit sub-block scales and mins byte-major, then (Q5_K)
                // `qh` and `qs` as vectors of dwords.
                f(0, 2 * r, 2);
                f(2, 32 + 2 * r, 2);
                for k in 0..12 {
                    f(4 + k, 64 + 16 * k + r, 1);
                }
                for dword in 0..(bb - 16) / 4 {
                    f(16 + 4 * dword, 256 + 64 * dword + 4 * r, 4);
                }
            }
            Layout::Vnni16 if qtype == QType::Q6_K => {
                // A super-block: 16 f16 scales, 16 x 16 int8 sub-block scales
                // (sub-block-major), then `ql` and `qh` as vectors of dwords.
                f(208, 2 * r, 2);
                for j in 0..16 {
                    f(192 + j, 32 + 16 * j + r, 1);
                }
                for dword in 0..48 {
                    f(4 * dword, 288 + 64 * dword + 4 * r, 4);
                }
            }
            Layout::Vnni16 => {
                let head = vnni16_head(qtype);
                for field in 0..head / 2 {
                    f(2 * field, 32 * field + 2 * r, 2);
                }
                for dword in 0..(bb - head) / 4 {
                    f(head + 4 * dword, 16 * head + 64 * dword + 4 * r, 4);
                }
            }
        }
    }

    /// What is added to quant bytes (mod 256) when stored in this layout.
    fn quant_offset(self, qtype: QType) -> u8 {
        match (self, qtype) {
            (Layout::Vnni16, QType::Q8_0 | QType::A8) => 0x80,
            _ => 0,
        }
    }

    /// Rearranges the full panels of `data` (rows of `rb` bytes) from the
    /// file's layout into this one.
    pub fn pack(self, qtype: QType, rb: usize, data: &mut [u8]) {
        let (g, bb) = (self.group(), qtype.block_bytes());
        if g == 1 {
            return;
        }
        let (head, add) = (vnni16_head(qtype), self.quant_offset(qtype));
        let mut plain = vec![0u8; g * rb];
        let full = data.len() / (g * rb) * g * rb;
        for panel in data[..full].chunks_exact_mut(g * rb) {
            plain.copy_from_slice(panel);
            for (b, blocks) in panel.chunks_exact_mut(g * bb).enumerate() {
                for r in 0..g {
                    let src = &plain[r * rb + b * bb..];
                    self.runs(qtype, r, |s, d, n| blocks[d..d + n].copy_from_slice(&src[s..s + n]));
                }
                if add != 0 {
                    blocks[g * head..].iter_mut().for_each(|q| *q = q.wrapping_add(add));
                }
            }
        }
    }

    /// Row `r` (of a full panel) as the file stores it, gathered from
    /// `panel`, the bytes of its group of rows.
    pub fn gather(self, qtype: QType, panel: &[u8], r: usize) -> Vec<u8> {
        let (g, bb) = (self.group(), qtype.block_bytes());
        let (head, add) = (vnni16_head(qtype), self.quant_offset(qtype));
        let mut row = vec![0u8; panel.len() / g];
        for (blocks, out) in panel.chunks_exact(g * bb).zip(row.chunks_exact_mut(bb)) {
            self.runs(qtype, r, |s, d, n| out[s..s + n].copy_from_slice(&blocks[d..d + n]));
            if add != 0 {
                out[head..].iter_mut().for_each(|q| *q = q.wrapping_sub(add));
            }
        }
        row
    }
}

/// Bytes of f16 scale fields before a block's quants in `Vnni16`: the
/// scale, then for Q4_1, Q5_1 and MLX's 8-bit blocks the min (bias). Q5
/// blocks' 4 bytes of high bits then come first among the dwords, so they
/// form one vector of the 16 rows' high bits.
fn vnni16_head(qtype: QType) -> usize {
    match qtype {
        QType::Q4_1 | QType::Q5_1 | QType::A8 => 4,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout is a permutation of the bytes that `gather` undoes.
    #[test]
    fn gather_undoes_pack() {
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q5_0, QType::Q5_1, QType::Q8_0, QType::A8, QType::Q4_K, QType::Q5_K, QType::Q6_K] {
            for layout in [Layout::Vnni16] {
                let (rows, rb) = (16 * 2 + 3, qtype.row_bytes(512));
                let plain: Vec<u8> = (0..rows * rb).map(|i| (i * 7 + i / 13) as u8).collect();
                let mut packed = plain.clone();
                layout.pack(qtype, rb, &mut packed);
                assert_ne!(packed, plain, "{layout:?} {qtype:?}");
                let g = layout.group();
                for r in 0..rows / g * g {
                    let panel = &packed[r / g * g * rb..(r / g + 1) * g * rb];
                    assert_eq!(layout.gather(qtype, panel, r % g), plain[r * rb..(r + 1) * rb], "{layout:?} {qtype:?} row {r}");
                }
                // Rows past the last full panel stay as they were.
                assert_eq!(packed[rows / g * g * rb..], plain[rows / g * g * rb..]);
            }
        }
    }
}
