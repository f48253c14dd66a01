//! Long-context rotary scalings, shared by both weight formats. Each comes
//! down to per-pair divisors of the rotary frequencies (`Hparams::
//! rope_factors`, llama.cpp's `rope_freqs`) and, for YaRN and LongRoPE, a
//! multiplier of the rotated queries and keys (`Hparams::rope_mscale`).
//!
//! A config names the scaling; which formula each name means follows
//! mlx-lm's `rope_utils` (the reference our parity fixtures are computed
//! with) and agrees with llama.cpp's reading of the same GGUF metadata.

use std::f32::consts::PI;

/// Llama 3's scaling: long wavelengths slow down by `factor`, short ones
/// stay, the band between blends the two.
pub fn llama3(factor: f32, low: f32, high: f32, old_ctx: f32, theta: f32, head_dim: usize) -> Result<Vec<f32>, String> {
    if high <= low {
        return Err(format!("rope scaling high_freq_factor {high} must exceed low_freq_factor {low}"));
    }
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    Ok((0..head_dim / 2)
        .map(|i| {
            let wavelen = 2.0 * PI * theta.powf(2.0 * i as f32 / head_dim as f32);
            if wavelen > low_wavelen {
                factor
            } else if wavelen > high_wavelen {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            } else {
                1.0
            }
        })
        .collect())
}

/// YaRN's parameters (Peng et al. 2023), with the defaults of its paper.
#[derive(Debug, Clone, Copy)]
pub struct Yarn {
    pub factor: f32,
    pub original_context: f32,
    /// Pairs turning more than `beta_fast` times over the original context
    /// keep their frequency; fewer than `beta_slow` times, they are divided
    /// by `factor`; a linear ramp between.
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// DeepSeek's pair of attention-temperature knobs (1 and 0 elsewhere).
    pub mscale: f32,
    pub mscale_all_dim: f32,
}

impl Yarn {
    pub fn new(factor: f32, original_context: f32) -> Self {
        Yarn { factor, original_context, beta_fast: 32.0, beta_slow: 1.0, mscale: 1.0, mscale_all_dim: 0.0 }
    }

    /// Frequency divisors and the query/key multiplier.
    pub fn scale(&self, theta: f32, head_dim: usize) -> (Vec<f32>, f32) {
        let d = head_dim as f32;
        // The pair index at which a frequency turns `turns` times over the
        // original context.
        let pair_at = |turns: f32| d * (self.original_context / (turns * 2.0 * PI)).ln() / (2.0 * theta.ln());
        let low = pair_at(self.beta_fast).floor().max(0.0);
        let mut high = pair_at(self.beta_slow).ceil().min(d - 1.0);
        if high == low {
            high += 0.001;
        }
        let factors = (0..head_dim / 2)
            .map(|i| {
                // 1: keep the trained frequency; 0: interpolate by `factor`.
                let keep = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                1.0 / (keep + (1.0 - keep) / self.factor)
            })
            .collect();
        let temperature = |m: f32| if self.factor <= 1.0 { 1.0 } else { 0.1 * m * self.factor.ln() + 1.0 };
        (factors, temperature(self.mscale) / temperature(self.mscale_all_dim))
    }
}

/// LongRoPE's (Phi-3's) query/key multiplier for a model stretched from
/// `original` positions to `context`.
pub fn longrope_mscale(context: f32, original: f32) -> f32 {
    let factor = context / original;
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / original.ln()).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_fast_pairs_and_interpolates_slow_ones() {
        // head 128, theta 1e6, 32k -> 128k (Qwen 2.5's published setting).
        let (f, m) = Yarn::new(4.0, 32768.0).scale(1e6, 128);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 4.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "divisors grow with the wavelength");
        assert!(f.iter().any(|&x| x > 1.0 && x < 4.0), "a ramp between");
        assert!((m - (1.0 + 0.1 * 4f32.ln())).abs() < 1e-6);
        // No stretch, no change.
        let (f, m) = Yarn::new(1.0, 32768.0).scale(1e6, 128);
        assert!(f.iter().all(|&x| x == 1.0) && m == 1.0);
    }

    #[test]
    fn longrope_multiplier() {
        assert_eq!(longrope_mscale(4096.0, 4096.0), 1.0);
        let m = longrope_mscale(131072.0, 4096.0);
        assert!((m - (1.0 + 32f32.ln() / 4096f32.ln()).sqrt()).abs() < 1e-6, "{m}");
    }
}
