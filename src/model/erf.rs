//! `libm::erff` — the erf candle's `gelu_erf` calls — to the bit, written
//! without branches so that the compiler vectorises it over a slice.
//!
//! Training on the CPU spent a sixth of its time in libm's erf, its `expf`
//! included (one per GELU input and step), and libm's is scalar: branches on the argument's range, two
//! calls of its `expf` in the tails. Here every lane computes each range's
//! formula with the same f32 operations in the same order (FreeBSD's
//! `s_erff.c` and `e_expf.c` as `libm` 0.2 ports them) and selects the one its
//! argument falls in; IEEE arithmetic is the same in a vector lane as in a
//! scalar register, and Rust never contracts `a * b + c` into a fused
//! multiply-add, so the results are libm's bits — tested against it on every
//! 61st f32 bit pattern here, and on all 2³² of them by the ignored test.
//!
//! Only the part of `expf`'s domain that erf reaches is kept: arguments in
//! [−37, 1], where no over- or underflow case of `expf` applies.

#![allow(clippy::excessive_precision)] // the coefficients below are libm's digits, copied as written

/// `erff(x * scale)` for each x of `xs`: the loop compiled for AVX2 where the
/// CPU has it (the same bits either way: no operation here rounds differently
/// in a wider register).
pub fn erff_scaled(xs: &[f32], scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; xs.len()];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { erff_scaled_avx2(xs, scale, &mut out) };
        return out;
    }
    erff_scaled_loop(xs, scale, &mut out);
    out
}

/// [`erff_scaled_loop`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn erff_scaled_avx2(xs: &[f32], scale: f32, out: &mut [f32]) {
    erff_scaled_loop(xs, scale, out)
}

#[inline(always)]
fn erff_scaled_loop(xs: &[f32], scale: f32, out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = erff(x * scale);
    }
}

/// `libm::erff(x)`, bit for bit.
#[inline(always)]
pub fn erff(x: f32) -> f32 {
    let bits = x.to_bits();
    let negative = bits >> 31 != 0;
    let ix = bits & 0x7fff_ffff;
    let sign = |y: f32| if negative { -y } else { y };

    // |x| < 2^-28
    let tiny = 0.125 * (8.0 * x + EFX8 * x);
    // |x| < 0.84375
    let z = x * x;
    let r = PP0 + z * (PP1 + z * (PP2 + z * (PP3 + z * PP4)));
    let s = 1.0 + z * (QQ1 + z * (QQ2 + z * (QQ3 + z * (QQ4 + z * QQ5))));
    let small = x + x * (r / s);
    // |x| < 1.25: 1 - erfc1(x)
    let mid = 1.0 - erfc1(x);
    // |x| < 6: 1 - erfc2(x)
    let tail = 1.0 - erfc2(ix, x);
    // |x| ≥ 6
    let one = 1.0 - f32::from_bits(0x0380_0000);
    // inf and NaN
    let special = 1.0 - 2.0 * (negative as u32 as f32) + 1.0 / x;

    if ix >= 0x7f80_0000 {
        special
    } else if ix < 0x3180_0000 {
        tiny
    } else if ix < 0x3f58_0000 {
        small
    } else if ix < 0x3fa0_0000 {
        sign(mid)
    } else if ix < 0x40c0_0000 {
        sign(tail)
    } else {
        sign(one)
    }
}

/// `erfc` on [0.84375, 1.25), as libm's `erfc1`.
#[inline(always)]
fn erfc1(x: f32) -> f32 {
    let s = x.abs() - 1.0;
    let p = PA0 + s * (PA1 + s * (PA2 + s * (PA3 + s * (PA4 + s * (PA5 + s * PA6)))));
    let q = 1.0 + s * (QA1 + s * (QA2 + s * (QA3 + s * (QA4 + s * (QA5 + s * QA6)))));
    1.0 - ERX - p / q
}

/// `erfc` on [1.25, 6), as libm's `erfc2` past its `erfc1` case. The two
/// polynomials of libm's ranges ([1.25, 1/0.35) and beyond) share one
/// evaluation with the coefficients selected: the shorter one's missing top
/// coefficient is 0, and `c + s * 0` is `c` exactly.
#[inline(always)]
fn erfc2(ix: u32, x: f32) -> f32 {
    let x = x.abs();
    let s = 1.0 / (x * x);
    let a = ix < 0x4036_db6d;
    // Selects between two constants per lane (an index by `a` would be a gather).
    let r = |i: usize| if a { R[i][0] } else { R[i][1] };
    let sc = |i: usize| if a { S[i][0] } else { S[i][1] };
    let num = r(0) + s * (r(1) + s * (r(2) + s * (r(3) + s * (r(4) + s * (r(5) + s * (r(6) + s * r(7)))))));
    let den = 1.0
        + s * (sc(0) + s * (sc(1) + s * (sc(2) + s * (sc(3) + s * (sc(4) + s * (sc(5) + s * (sc(6) + s * sc(7))))))));
    let z = f32::from_bits(x.to_bits() & 0xffff_e000);
    expf(-z * z - 0.5625) * expf((z - x) * (z + x) + num / den) / x
}

/// libm's `expf` for x in [−37, 1] (what [`erfc2`] asks of it), bit for bit.
/// Its three argument ranges are one formula here: with k = 0, `x - 0 * ln2hi`
/// is x and `0 * ln2lo` is 0, as its middle range has them, and `2^0` scales
/// nothing.
#[inline(always)]
fn expf(x: f32) -> f32 {
    let bits = x.to_bits();
    let negative = bits >> 31 != 0;
    let hx = bits & 0x7fff_ffff;
    let k: i32 = if hx > 0x3f85_1592 {
        (INV_LN2 * x + if negative { -0.5 } else { 0.5 }) as i32
    } else if hx > 0x3eb1_7218 {
        if negative {
            -1
        } else {
            1
        }
    } else {
        0
    };
    let kf = k as f32;
    let hi = x - kf * LN2_HI;
    let lo = kf * LN2_LO;
    let xr = hi - lo;
    let xx = xr * xr;
    let c = xr - xx * (P1 + xx * P2);
    let y = 1. + (xr * c / (2. - c) - lo + hi);
    let scaled = y * f32::from_bits((0x7f_i32.wrapping_add(k) as u32) << 23);
    if hx > 0x3900_0000 {
        scaled
    } else {
        1. + x
    }
}

// The coefficients as FreeBSD's sources and `libm` write them, digit for digit.
const ERX: f32 = 8.4506291151e-01;
const EFX8: f32 = 1.0270333290e+00;
const PP0: f32 = 1.2837916613e-01;
const PP1: f32 = -3.2504209876e-01;
const PP2: f32 = -2.8481749818e-02;
const PP3: f32 = -5.7702702470e-03;
const PP4: f32 = -2.3763017452e-05;
const QQ1: f32 = 3.9791721106e-01;
const QQ2: f32 = 6.5022252500e-02;
const QQ3: f32 = 5.0813062117e-03;
const QQ4: f32 = 1.3249473704e-04;
const QQ5: f32 = -3.9602282413e-06;
const PA0: f32 = -2.3621185683e-03;
const PA1: f32 = 4.1485610604e-01;
const PA2: f32 = -3.7220788002e-01;
const PA3: f32 = 3.1834661961e-01;
const PA4: f32 = -1.1089469492e-01;
const PA5: f32 = 3.5478305072e-02;
const PA6: f32 = -2.1663755178e-03;
const QA1: f32 = 1.0642088205e-01;
const QA2: f32 = 5.4039794207e-01;
const QA3: f32 = 7.1828655899e-02;
const QA4: f32 = 1.2617121637e-01;
const QA5: f32 = 1.3637083583e-02;
const QA6: f32 = 1.1984500103e-02;
/// `erfc2`'s numerator coefficients, `[RAi, RBi]` for i = 0…7: libm's two ranges side by side, RB7 = 0
/// (its polynomial stops at RB6).
const R: [[f32; 2]; 8] = [
    [-9.8649440333e-03, -9.8649431020e-03],
    [-6.9385856390e-01, -7.9928326607e-01],
    [-1.0558626175e+01, -1.7757955551e+01],
    [-6.2375331879e+01, -1.6063638306e+02],
    [-1.6239666748e+02, -6.3756646729e+02],
    [-1.8460508728e+02, -1.0250950928e+03],
    [-8.1287437439e+01, -4.8351919556e+02],
    [-9.8143291473e+00, 0.0],
];
/// Its denominator's, `[SAi, SBi]` for i = 1…8, SB8 = 0.
const S: [[f32; 2]; 8] = [
    [1.9651271820e+01, 3.0338060379e+01],
    [1.3765776062e+02, 3.2579251099e+02],
    [4.3456588745e+02, 1.5367296143e+03],
    [6.4538726807e+02, 3.1998581543e+03],
    [4.2900814819e+02, 2.5530502930e+03],
    [1.0863500214e+02, 4.7452853394e+02],
    [6.5702495575e+00, -2.2440952301e+01],
    [-6.0424413532e-02, 0.0],
];
const LN2_HI: f32 = 6.9314575195e-01;
const LN2_LO: f32 = 1.4286067653e-06;
const INV_LN2: f32 = 1.4426950216e+00;
const P1: f32 = 1.6666625440e-1;
const P2: f32 = -2.7667332906e-3;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f32 bit pattern from `first`, `step` apart, through the vector
    /// loop, against libm's scalar erf (NaNs compared as NaNs).
    fn check(first: u32, step: usize) {
        let patterns: Vec<f32> = (first..=u32::MAX).step_by(step).map(f32::from_bits).collect();
        for chunk in patterns.chunks(1 << 20) {
            for (&x, &ours) in chunk.iter().zip(&erff_scaled(chunk, 1.0)) {
                let libm = candle_core::cpu::erf::erf_f32(x);
                assert!(
                    ours.to_bits() == libm.to_bits() || (ours.is_nan() && libm.is_nan()),
                    "erf({x:e} = {:#010x}): {ours:e} against libm's {libm:e}",
                    x.to_bits()
                );
            }
        }
    }

    #[test]
    fn libms_bits_on_every_61st_pattern() {
        check(0, 61);
    }

    /// All 2³² patterns (a minute in a release build: `cargo test --release
    /// --lib erf -- --ignored`).
    #[test]
    #[ignore]
    fn libms_bits_on_every_pattern() {
        check(0, 1);
    }
}
