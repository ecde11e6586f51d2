//! The CPU serving path: the classifier's forward pass written out over
//! plain `f32` slices, for a model small enough that candle's general tensor
//! operations (an allocation, a dispatch and often a copy each) cost more
//! than their arithmetic.
//!
//! What it does that the tensor path cannot:
//! - **No padding.** The tokens of all the texts of a batch are the rows of
//!   one matrix for the projections and the feed-forward layers; attention
//!   runs over each text's own tokens. Nothing is computed for padding, and
//!   there is no attention mask.
//! - **Only what the output reads.** The classifier reads the last layer's
//!   `[CLS]` row alone, so that layer computes keys and values for every
//!   token and the rest (query, attention, feed-forward) for `[CLS]` only.
//!   On the default two-layer model that is 36 % fewer operations at its
//!   mean length of 18.5 tokens (`triagem bench` prints the count).
//! - **One pass a step.** Each product is written onto its bias (the `gemm`
//!   crate reads the destination), the residual add is done inside the layer
//!   norm, attention is one loop per text and head without score tensors, and
//!   the loops are compiled for the CPU's widest vector unit (`pulp`).
//! - **Threads that do not meet.** A batch is split between the model's
//!   threads by texts, each part run start to end by one thread; a batch of
//!   one text splits each large product into bands of output columns, one a
//!   thread, each thread reading only its band of the weights.
//!
//! The tensor path (`bert.rs`) stays the reference and serves everything
//! else: training, hidden states, the GPU. A test holds the two to the same
//! logits; the parity tests hold this one to `transformers`.

use std::cell::RefCell;

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Which activation the feed-forward layers use (the model's `hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: x·Φ(x), with erf.
    GeluErf,
    /// `gelu_new` and friends: the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => candle_core::bail!("hidden_act {other:?} is not supported (gelu, gelu_new, relu)"),
        }
    }

    #[inline(always)]
    fn apply_in_place(self, xs: &mut [f32]) {
        match self {
            Self::GeluErf => {
                for x in xs {
                    *x = gelu_erf(*x);
                }
            }
            Self::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                for x in xs {
                    let v = *x;
                    *x = 0.5 * v * (1.0 + (SQRT_2_OVER_PI * v * (1.0 + 0.044_715 * v * v)).tanh());
                }
            }
            Self::Relu => {
                for x in xs {
                    *x = x.max(0.0);
                }
            }
        }
    }
}

/// A dense layer: weights transposed to (in, out), so that `y = x · w + b` with `x` row-major.
pub struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

impl Dense {
    /// From a weight shaped (out, in), as candle's `Linear` and PyTorch store it, and a bias (out).
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (n_out, n_in) = weight.dims2()?;
        let w = weight.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let b = bias.to_vec1::<f32>()?;
        if b.len() != n_out {
            candle_core::bail!("a bias of {} for a layer of {n_out} outputs", b.len());
        }
        Ok(Self { w, b, n_in, n_out })
    }

    /// Two layers: the first `first` outputs of this one, and the rest.
    pub fn split_outputs(&self, first: usize) -> (Dense, Dense) {
        let part = |range: std::ops::Range<usize>| Dense {
            w: self.w.chunks_exact(self.n_out).flat_map(|row| &row[range.clone()]).copied().collect(),
            b: self.b[range.clone()].to_vec(),
            n_in: self.n_in,
            n_out: range.len(),
        };
        (part(0..first), part(first..self.n_out))
    }

    /// `out` = `x` (`rows` × in) · w + b, (`rows` × out). With `threads` > 1
    /// and a product large enough, each thread computes a band of the output
    /// columns from its own band of the weights.
    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>, threads: usize) {
        debug_assert_eq!(x.len(), rows * self.n_in);
        out.clear();
        for _ in 0..rows {
            out.extend_from_slice(&self.b);
        }
        if rows == 0 {
            return;
        }
        let dst = OutPtr(out.as_mut_ptr());
        let bands = if rows * self.n_in * self.n_out < SPLIT_MIN_MULTIPLY_ADDS { 1 } else { threads };
        if bands <= 1 {
            // SAFETY: `dst` holds rows × n_out values; the band is all of them.
            unsafe { self.band(x, rows, dst, 0..self.n_out) };
            return;
        }
        // Bands in whole micro-kernel rows (16 outputs), at most one a thread.
        let width = self.n_out.div_ceil(bands).next_multiple_of(16);
        (0..self.n_out.div_ceil(width)).into_par_iter().for_each(|band| {
            let start = band * width;
            // SAFETY: the bands are disjoint column ranges of `dst`, which outlives this loop.
            unsafe { self.band(x, rows, dst, start..(start + width).min(self.n_out)) }
        });
    }

    /// Columns `cols` of `dst` (`rows` × out, row-major, holding the bias) += `x` · w[.., cols].
    ///
    /// # Safety
    /// `dst` points at `rows` × `n_out` values that nothing else reads or
    /// writes in the columns `cols` while this runs.
    unsafe fn band(&self, x: &[f32], rows: usize, dst: OutPtr, cols: std::ops::Range<usize>) {
        // SAFETY: `x` holds rows × n_in and `w` n_in × n_out values, row-major
        // with the strides given; `cols` lies inside 0..n_out (the caller's
        // range), so every pointer offset stays inside its buffer.
        unsafe {
            gemm::gemm(
                rows,
                cols.len(),
                self.n_in,
                dst.get().add(cols.start),
                1,
                self.n_out as isize,
                true,
                x.as_ptr(),
                1,
                self.n_in as isize,
                self.w.as_ptr().add(cols.start),
                1,
                self.n_out as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    }
}

/// Below this many multiply-adds a product runs on one thread: handing half
/// of it to another thread costs more than it saves (the `gemm` crate's own
/// threshold, 48 × 48 × 256).
const SPLIT_MIN_MULTIPLY_ADDS: usize = 48 * 48 * 256;

/// The output of a product, shared by the threads that write its column bands.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: the threads given an `OutPtr` write disjoint columns (see `Dense::band`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, so that closures capture the whole `OutPtr` (Send) and not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Layer norm over rows of `weight.len()` values.
pub struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    pub fn new(weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self { weight: weight.to_vec1()?, bias: bias.to_vec1()?, eps: eps as f32 })
    }

    /// `xs` ← layer_norm(`xs` + `residual`), row by row.
    #[inline(always)]
    fn apply(&self, xs: &mut [f32], residual: Option<&[f32]>) {
        let h = self.weight.len();
        for (i, row) in xs.chunks_exact_mut(h).enumerate() {
            if let Some(r) = residual {
                for (x, r) in row.iter_mut().zip(&r[i * h..(i + 1) * h]) {
                    *x += r;
                }
            }
            let mean = sum(row) / h as f32;
            let mut var_acc = [0f32; LANES];
            for chunk in row.chunks(LANES) {
                for (a, x) in var_acc.iter_mut().zip(chunk) {
                    *a += (x - mean) * (x - mean);
                }
            }
            let inv = 1.0 / (var_acc.iter().sum::<f32>() / h as f32 + self.eps).sqrt();
            for ((x, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *x = (*x - mean) * inv * w + b;
            }
        }
    }
}

/// One encoder layer, its query/key/value projections as one (query pre-scaled by 1/√head_dim).
pub struct Layer {
    pub qkv: Dense,
    /// The last layer's: `qkv` split into the query and the key-value projections, so that the
    /// query is computed for `[CLS]` alone.
    pub query_and_key_value: Option<(Dense, Dense)>,
    pub attention_out: Dense,
    pub attention_norm: Norm,
    pub intermediate: Dense,
    pub output: Dense,
    pub output_norm: Norm,
}

/// The weights of a `BertForSequenceClassification`, laid out for this path.
pub struct CpuBert {
    pub hidden: usize,
    pub heads: usize,
    pub activation: Activation,
    /// Word embeddings, (vocab, hidden).
    pub word: Vec<f32>,
    /// Position embeddings plus the token-type-0 embedding, (positions, hidden).
    pub position: Vec<f32>,
    pub embedding_norm: Norm,
    pub layers: Vec<Layer>,
    pub pooler: Dense,
    pub classifier: Dense,
}

/// Accumulators a reduction keeps so that it vectorises (f32 addition is not reassociated otherwise).
const LANES: usize = 8;

/// The scratch buffers of one thread's part of a batch, kept per thread
/// between batches: allocated afresh, the larger ones come from `mmap` and
/// cost a page fault per 4 KiB on every batch (a tenth of the time at batch 32).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    query: Vec<f32>,
    context: Vec<f32>,
    inner: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
}

impl CpuBert {
    fn vocab(&self) -> usize {
        self.word.len() / self.hidden
    }

    fn positions(&self) -> usize {
        self.position.len() / self.hidden
    }

    fn labels(&self) -> usize {
        self.classifier.n_out
    }

    /// Logits of `texts`, each given as its token ids (`[CLS]` first, no
    /// padding), one row per text. Runs on the current rayon pool (the
    /// model's, inside [`super::threads::install`]).
    pub fn logits(&self, texts: &[&[u32]]) -> std::result::Result<Vec<Vec<f32>>, String> {
        pack_weights_from_seven_tokens();
        for (i, t) in texts.iter().enumerate() {
            if t.is_empty() {
                return Err(format!("text {i} of the batch has no tokens"));
            }
            if t.len() > self.positions() {
                return Err(format!(
                    "text {i} of the batch has {} tokens; the model takes at most {}",
                    t.len(),
                    self.positions()
                ));
            }
            if let Some(&id) = t.iter().find(|&&id| id as usize >= self.vocab()) {
                return Err(format!("token id {id} of text {i} is outside the model's vocabulary of {}", self.vocab()));
            }
        }
        let threads = rayon::current_num_threads();
        let parts = split_by_tokens(texts, threads);
        let flat: Vec<f32> = if parts.len() <= 1 {
            self.forward(texts, threads)
        } else {
            let outs: Vec<Vec<f32>> = parts.into_par_iter().map(|r| self.forward(&texts[r], 1)).collect();
            outs.concat()
        };
        Ok(flat.chunks(self.labels()).map(<[f32]>::to_vec).collect())
    }

    /// Logits, flat (text × label), of texts already checked; all on this thread but for
    /// products split into column bands over `threads`.
    fn forward(&self, texts: &[&[u32]], threads: usize) -> Vec<f32> {
        thread_local! {
            static SCRATCH: RefCell<Scratch> = RefCell::default();
        }
        SCRATCH.with(|cell| {
            // Busy when this thread, waiting inside a parallel product, was lent another batch's part.
            let mut fresh = Scratch::default();
            let mut held = cell.try_borrow_mut();
            let s = held.as_deref_mut().unwrap_or(&mut fresh);
            pulp::Arch::new().dispatch(
                #[inline(always)]
                || self.forward_simd(texts, threads, s),
            )
        })
    }

    #[inline(always)]
    fn forward_simd(&self, texts: &[&[u32]], threads: usize, s: &mut Scratch) -> Vec<f32> {
        let h = self.hidden;
        let lengths: Vec<usize> = texts.iter().map(|t| t.len()).collect();
        let tokens: usize = lengths.iter().sum();

        // Embeddings: word + (position + type 0), then layer norm.
        s.x.clear();
        s.x.resize(tokens * h, 0.0);
        let mut rows = s.x.chunks_exact_mut(h);
        for text in texts {
            for (p, &id) in text.iter().enumerate() {
                let row = rows.next().expect("one row a token");
                let word = &self.word[id as usize * h..][..h];
                let position = &self.position[p * h..][..h];
                for ((x, w), q) in row.iter_mut().zip(word).zip(position) {
                    *x = w + q;
                }
            }
        }
        self.embedding_norm.apply(&mut s.x, None);

        let mut rows = tokens;
        let mut cls_only = false;
        for layer in &self.layers {
            match &layer.query_and_key_value {
                Some((query, key_value)) => {
                    // Keys and values of every token; from here on only the [CLS] rows.
                    key_value.forward(&s.x, rows, &mut s.qkv, threads);
                    gather_first_rows(&mut s.x, &lengths, h);
                    rows = texts.len();
                    cls_only = true;
                    query.forward(&s.x, rows, &mut s.query, threads);
                    let (q, kv) = (Rows { data: &s.query, width: h }, Rows { data: &s.qkv, width: 2 * h });
                    attention(q, kv, 0, &lengths, self.heads, true, &mut s.context, &mut s.scores);
                }
                None => {
                    layer.qkv.forward(&s.x, rows, &mut s.qkv, threads);
                    let (q, kv) = (Rows { data: &s.qkv, width: 3 * h }, Rows { data: &s.qkv, width: 3 * h });
                    attention(q, kv, h, &lengths, self.heads, false, &mut s.context, &mut s.scores);
                }
            }
            layer.attention_out.forward(&s.context, rows, &mut s.tmp, threads);
            layer.attention_norm.apply(&mut s.tmp, Some(&s.x));
            std::mem::swap(&mut s.x, &mut s.tmp);
            layer.intermediate.forward(&s.x, rows, &mut s.inner, threads);
            self.activation.apply_in_place(&mut s.inner);
            layer.output.forward(&s.inner, rows, &mut s.tmp, threads);
            layer.output_norm.apply(&mut s.tmp, Some(&s.x));
            std::mem::swap(&mut s.x, &mut s.tmp);
        }
        if !cls_only {
            gather_first_rows(&mut s.x, &lengths, h);
        }
        // Pooler (tanh over [CLS]) and the classification head.
        self.pooler.forward(&s.x, texts.len(), &mut s.tmp, threads);
        for v in &mut s.tmp {
            *v = v.tanh();
        }
        let mut logits = Vec::new();
        self.classifier.forward(&s.tmp, texts.len(), &mut logits, threads);
        logits
    }
}

/// Makes the `gemm` crate pack a block of weights before multiplying it
/// whenever a product has more than 6 token rows (its default: more than 48
/// on one thread, 96 on several).
///
/// Our products are `tokens × in` by `in × out`, which `gemm` computes as
/// `out × in` by `in × tokens`, six tokens per micro-kernel call. Unpacked,
/// each block of weights is read from memory again for every six tokens of
/// the batch, with a stride of a whole row between its values; packed, it is
/// read once and then served from L1. A model whose weights stay in cache
/// (the default: 1.6 MB of encoder weights) does not notice; MiniLM-L6's 88
/// MB made a single message memory-bound. Measured with `triagem bench
/// --threads 1` on MiniLM-L6 with a classification head (512 messages of 28
/// tokens): batch 1 went from 77/75 to 90–94 msg/s; batches of 2 to 8,
/// whose products already had enough rows, are unchanged; on two threads a
/// batch of two (one text per thread) went from ~150 to ~190 msg/s. The
/// default model: within noise. The setting is the process's (candle's
/// products read it too); packing copies values, so results are the same
/// bits (a training epoch gave the same `model.safetensors`).
fn pack_weights_from_seven_tokens() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        gemm::set_lhs_packing_threshold_single_thread(1);
        gemm::set_lhs_packing_threshold_multi_thread(1);
    });
}

/// Keeps the first row of each text (its `[CLS]`) of rows laid out text after text, in place.
fn gather_first_rows(xs: &mut Vec<f32>, lengths: &[usize], h: usize) {
    let mut start = 0;
    for (i, &len) in lengths.iter().enumerate() {
        xs.copy_within(start * h..(start + 1) * h, i * h);
        start += len;
    }
    xs.truncate(lengths.len() * h);
}

/// Rows of `width` values, one a token (or a text), laid out one after another.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    width: usize,
}

/// Self-attention of each text over its own tokens. `kv` holds a row per
/// token, its key at column `key_at` and its value right after, each `h`
/// wide with the heads side by side (`h` being the query's width); `q` holds
/// the (pre-scaled) queries at column 0: a row per token, or one per text (its
/// `[CLS]`) when `cls_only`. Writes one context row per query into `context`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attention(
    q: Rows,
    kv: Rows,
    key_at: usize,
    lengths: &[usize],
    heads: usize,
    cls_only: bool,
    context: &mut Vec<f32>,
    scores: &mut Vec<f32>,
) {
    let h = if cls_only { q.width } else { q.width / 3 };
    let d = h / heads;
    let value_at = key_at + h;
    let queries: usize = if cls_only { lengths.len() } else { lengths.iter().sum() };
    context.clear();
    context.resize(queries * h, 0.0);
    let mut out_rows = context.chunks_exact_mut(h);
    let mut start = 0;
    for (t, &len) in lengths.iter().enumerate() {
        let text = &kv.data[start * kv.width..(start + len) * kv.width];
        for i in 0..if cls_only { 1 } else { len } {
            let out_row = out_rows.next().expect("one context row a query");
            let q_row = &q.data[if cls_only { t } else { start + i } * q.width..][..h];
            for head in 0..heads {
                let q = &q_row[head * d..][..d];
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in 0..len {
                    let k = &text[j * kv.width + key_at + head * d..][..d];
                    let s = dot(q, k);
                    max = max.max(s);
                    scores.push(s);
                }
                let mut total = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    total += *s;
                }
                let inv = 1.0 / total;
                let out = &mut out_row[head * d..][..d];
                for (j, &p) in scores.iter().enumerate() {
                    let v = &text[j * kv.width + value_at + head * d..][..d];
                    let p = p * inv;
                    for (o, v) in out.iter_mut().zip(v) {
                        *o += p * v;
                    }
                }
            }
        }
        start += len;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for chunk in xs.chunks(LANES) {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum()
}

/// Up to `parts` contiguous ranges of `texts` with about the same number of tokens each.
fn split_by_tokens(texts: &[&[u32]], parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.min(texts.len()).max(1);
    let total: usize = texts.iter().map(|t| t.len()).sum();
    let mut ranges = Vec::with_capacity(parts);
    let (mut start, mut seen) = (0, 0);
    for (i, t) in texts.iter().enumerate() {
        seen += t.len();
        let (remaining, to_open) = (texts.len() - (i + 1), parts - ranges.len() - 1);
        // Close a part once it holds its share, or when each part still to come needs one of the texts left.
        if to_open > 0 && remaining >= to_open && (seen >= total * (ranges.len() + 1) / parts || remaining == to_open) {
            ranges.push(start..i + 1);
            start = i + 1;
        }
    }
    ranges.push(start..texts.len());
    ranges
}

/// `out[i] = gelu(xs[i])`, vectorised for the CPU it runs on (the tensor path's inference GELU).
pub fn gelu_erf_into(xs: &[f32], out: &mut [f32]) {
    pulp::Arch::new().dispatch(
        #[inline(always)]
        || {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = gelu_erf(x);
            }
        },
    )
}

/// GELU in its erf form, with erf from Abramowitz and Stegun 7.1.26
/// (absolute error below 1.5e-7). libm's `erff`, which candle's `gelu_erf`
/// calls, takes a branch for |x| ≥ 0.84 several times slower than its
/// small-argument one: a model whose feed-forward inputs are larger (the
/// pretrained default) spent 22 % of its time there. This one is branch-free
/// with its own `exp`, so that loops over it vectorise.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(x), Abramowitz and Stegun 7.1.26, branch-free: |x| is clamped at 4,
/// where erf differs from 1 by 2e-8.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs().min(4.0);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    (1.0 - poly * exp_neg(a * a)).copysign(x)
}

/// e^-y for y in [0, 16], branch-free: y = k ln 2 + r with |r| ≤ ln 2 / 2,
/// 2^-k from the exponent bits, e^-r from its Taylor polynomial to r^6
/// (relative error below 1.1e-6 against f64, most of it the f32 rounding of y · log2 e).
#[inline(always)]
fn exp_neg(y: f32) -> f32 {
    // Round to nearest by adding 1.5 × 2^23: the integer lands in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let v = -y * std::f32::consts::LOG2_E;
    let shifted = v + SHIFT;
    let k = shifted.to_bits() as i32 - SHIFT.to_bits() as i32;
    let r = (v - (shifted - SHIFT)) * std::f32::consts::LN_2;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_is_exp_of_minus_y_on_its_range() {
        assert_eq!(exp_neg(0.0), 1.0);
        let worst = (0..=16_000)
            .map(|i| i as f32 * 1e-3)
            .map(|y| ((exp_neg(y) as f64 - (-(y as f64)).exp()) / (-(y as f64)).exp()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1.2e-6, "worst relative error {worst:e}");
    }

    /// A product split into column bands over threads is the same product:
    /// against a plain triple loop, on 1 to 3 threads, for output widths that
    /// divide into bands evenly and not, large enough to be split.
    #[test]
    fn a_product_split_into_column_bands_is_the_same_product() {
        let (rows, n_in) = (19, 160);
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for n_out in [200, 256, 37 * 16 + 5] {
            assert!(rows * n_in * n_out >= SPLIT_MIN_MULTIPLY_ADDS, "{n_out} outputs would not be split");
            let dense = Dense {
                w: (0..n_in * n_out).map(value).collect(),
                b: (0..n_out).map(|i| value(i + 3)).collect(),
                n_in,
                n_out,
            };
            let x: Vec<f32> = (0..rows * n_in).map(|i| value(i + 11)).collect();
            let mut expected = vec![0f32; rows * n_out];
            for r in 0..rows {
                for o in 0..n_out {
                    let dot: f64 = (0..n_in).map(|i| x[r * n_in + i] as f64 * dense.w[i * n_out + o] as f64).sum();
                    expected[r * n_out + o] = (dot + dense.b[o] as f64) as f32;
                }
            }
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut out = Vec::new();
                pool.install(|| dense.forward(&x, rows, &mut out, threads));
                assert_eq!(out.len(), expected.len());
                let worst = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{n_out} outputs on {threads} threads: worst difference {worst}");
            }
        }
    }

    #[test]
    fn a_batch_is_split_by_tokens_into_nonempty_parts_in_order() {
        let texts: Vec<Vec<u32>> = [3usize, 30, 4, 5, 6, 40, 2].iter().map(|&n| vec![1; n]).collect();
        let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        for parts in 1..=9 {
            let ranges = split_by_tokens(&refs, parts);
            assert_eq!(ranges.len(), parts.min(refs.len()), "{parts} parts: {ranges:?}");
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges.last().unwrap().end, refs.len());
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            assert!(ranges.iter().all(|r| !r.is_empty()), "{parts} parts: {ranges:?}");
        }
        // 90 tokens: the first part closes at the text that brings it to 45 or more.
        assert_eq!(split_by_tokens(&refs, 2), vec![0..5, 5..7]);
    }
}
