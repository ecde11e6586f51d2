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
//! - **One pass a step.** Each product is added onto its bias, the residual
//!   add is done inside the layer norm, attention is one loop per text and
//!   head without score tensors, and the pass is compiled for AVX2 and FMA
//!   where the CPU has them.
//! - **Weights laid out for the product.** Each layer's weights are stored in
//!   panels of 16 output columns, read start to end by an AVX2/FMA tile of
//!   six rows (`panel_product`), which asks the memory for the next panel
//!   while it computes: a model whose weights do not stay in cache reads
//!   them at the memory's pace instead of waiting for each block (other
//!   CPUs: the `gemm` crate on the same panels).
//! - **Threads that do not meet.** A batch is split between the model's
//!   threads by texts, each part run start to end by one thread; a batch of
//!   one text splits each large product into bands of output columns, one a
//!   thread, each thread reading only its band of the weights, handed out
//!   to a team that waits for them for the length of the forward pass
//!   (`threads::Team`) rather than to a rayon section per product.
//!
//! The tensor path (`bert.rs`) stays the reference and serves everything
//! else: training, hidden states, the GPU. A test holds the two to the same
//! logits; the parity tests hold this one to `transformers`.

use std::cell::RefCell;

use candle_core::{Result, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::threads::{with_team, Team};

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

/// A dense layer, `y = x · w + b` with `x` row-major, its weights stored in
/// panels of 16 output columns (`PANEL`): panel `p` holds `w[k][16p..16p + 16]`
/// for every input `k`, `k` after `k` (the last panel padded with zeros), so
/// that a product reads each panel start to end, once for every six rows.
pub struct Dense {
    panels: Vec<f32>,
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

/// Output columns a panel holds: two 8-lane vectors.
const PANEL: usize = 16;

impl Dense {
    /// From a weight shaped (out, in), as candle's `Linear` and PyTorch store it, and a bias (out).
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (n_out, n_in) = weight.dims2()?;
        let w = weight.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let b = bias.to_vec1::<f32>()?;
        if b.len() != n_out {
            candle_core::bail!("a bias of {} for a layer of {n_out} outputs", b.len());
        }
        Ok(Self::from_in_out(&w, b, n_in, n_out))
    }

    /// From weights laid out (in, out), row-major, and a bias (out).
    fn from_in_out(w: &[f32], b: Vec<f32>, n_in: usize, n_out: usize) -> Self {
        debug_assert_eq!(w.len(), n_in * n_out);
        let mut panels = vec![0f32; n_out.div_ceil(PANEL) * PANEL * n_in];
        for (p, panel) in panels.chunks_exact_mut(PANEL * n_in).enumerate() {
            let cols = p * PANEL..((p + 1) * PANEL).min(n_out);
            for (k, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                row[..cols.len()].copy_from_slice(&w[k * n_out..][cols.clone()]);
            }
        }
        Self { panels, b, n_in, n_out }
    }

    /// The weight from input `k` to output `o`.
    fn weight(&self, k: usize, o: usize) -> f32 {
        self.panels[(o / PANEL) * PANEL * self.n_in + k * PANEL + o % PANEL]
    }

    /// Two layers: the first `first` outputs of this one, and the rest.
    pub fn split_outputs(&self, first: usize) -> (Dense, Dense) {
        let part = |range: std::ops::Range<usize>| {
            let w: Vec<f32> = (0..self.n_in).flat_map(|k| range.clone().map(move |o| self.weight(k, o))).collect();
            Dense::from_in_out(&w, self.b[range.clone()].to_vec(), self.n_in, range.len())
        };
        (part(0..first), part(first..self.n_out))
    }

    /// `out` = `x` (`rows` × in) · w + b, (`rows` × out). With a team of more
    /// than one thread and a product large enough, each member computes a band
    /// of the output columns from its own panels.
    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>, team: &Team) {
        debug_assert_eq!(x.len(), rows * self.n_in);
        out.clear();
        for _ in 0..rows {
            out.extend_from_slice(&self.b);
        }
        if rows == 0 {
            return;
        }
        let dst = OutPtr(out.as_mut_ptr());
        let bands = if rows * self.n_in * self.n_out < SPLIT_MIN_MULTIPLY_ADDS { 1 } else { team.size() };
        if bands <= 1 {
            // SAFETY: `dst` holds rows × n_out values; the band is all of them.
            unsafe { self.band(x, rows, dst, 0..self.n_out.div_ceil(PANEL)) };
            return;
        }
        // Bands of whole panels, at most one a thread.
        let panels = self.n_out.div_ceil(PANEL);
        let width = panels.div_ceil(bands);
        team.run(panels.div_ceil(width), &|band| {
            let start = band * width;
            // SAFETY: the bands are disjoint column ranges of `dst`, which outlives this call.
            unsafe { self.band(x, rows, dst, start..(start + width).min(panels)) }
        });
    }

    /// The columns of panels `panels` of `dst` (`rows` × out, row-major, holding the bias) += `x` ·
    /// their weights.
    ///
    /// # Safety
    /// `dst` points at `rows` × `n_out` values that nothing else reads or
    /// writes in the columns of `panels` while this runs.
    unsafe fn band(&self, x: &[f32], rows: usize, dst: OutPtr, panels: std::ops::Range<usize>) {
        let size = PANEL * self.n_in;
        let block = (INPUT_BLOCK_BYTES / (4 * self.n_in)).max(TILE_ROWS) / TILE_ROWS * TILE_ROWS;
        for first in (0..rows).step_by(block) {
            let (x, rows) = (&x[first * self.n_in..], block.min(rows - first));
            for p in panels.clone() {
                let panel = &self.panels[p * size..][..size];
                let width = PANEL.min(self.n_out - p * PANEL);
                let dst = dst.get().add(first * self.n_out + p * PANEL);
                #[cfg(target_arch = "x86_64")]
                if has_avx2_and_fma() {
                    // The band's next panel, asked for from memory while this one is computed.
                    let next = if p + 1 < panels.end { &self.panels[(p + 1) * size..][..size] } else { &[] };
                    // SAFETY: AVX2 and FMA are present; `x` holds rows × n_in values, the panels
                    // n_in × PANEL, and `dst` rows × n_out from this panel's first column, of which
                    // this writes `width`, inside the caller's.
                    unsafe { panel_product(x, rows, self.n_in, panel, next, dst, self.n_out, width) };
                    continue;
                }
                // SAFETY: as above.
                unsafe { self.panel_portable(x, rows, panel, dst, width) };
            }
        }
    }

    /// [`panel_product`]'s work without it: the `gemm` crate on the same panel (other CPUs
    /// and architectures).
    ///
    /// # Safety
    /// `dst` holds `rows` rows of `width` values, `n_out` apart.
    unsafe fn panel_portable(&self, x: &[f32], rows: usize, panel: &[f32], dst: *mut f32, width: usize) {
        assert!(x.len() >= rows * self.n_in && panel.len() >= self.n_in * PANEL && width <= PANEL);
        // SAFETY: `x` holds rows × n_in values and `panel` n_in × PANEL, row-major with the
        // strides given; `dst` as the caller says.
        unsafe {
            gemm::gemm(
                rows,
                width,
                self.n_in,
                dst,
                1,
                self.n_out as isize,
                true,
                x.as_ptr(),
                1,
                self.n_in as isize,
                panel.as_ptr(),
                1,
                PANEL as isize,
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

/// How much of the input a band multiplies by every panel before moving on to the next rows:
/// a block that stays in L2 (a quarter of this machine's 1 MiB), so that a large batch reads
/// its input from L2 for each panel and its weights from memory once a block.
const INPUT_BLOCK_BYTES: usize = 256 << 10;

#[cfg(target_arch = "x86_64")]
fn has_avx2_and_fma() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `dst` (`rows` × `width`, rows `dst_stride` apart) += `x` (`rows` × `k`, row-major) · `panel`
/// (`k` × [`PANEL`], row-major; its first `width` columns), six rows at a time, each six over
/// the whole panel with their 12 sums in registers. While it computes, it asks the memory for
/// `next` (a panel too, or empty), one cache line (a panel row) every few rows of `k`, spread
/// over its tiles of six: a model whose weights do not stay in cache (MiniLM-L6: 42 MB of
/// encoder) otherwise waits for each panel as it starts on it.
///
/// # Safety
/// AVX2 and FMA are available; `dst` holds the values described.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    x: &[f32],
    rows: usize,
    k: usize,
    panel: &[f32],
    next: &[f32],
    dst: *mut f32,
    dst_stride: usize,
    width: usize,
) {
    assert!(x.len() >= rows * k && panel.len() >= k * PANEL && width <= PANEL);
    let tiles = rows.div_ceil(TILE_ROWS);
    let next = if next.len() >= k * PANEL { next.as_ptr() } else { std::ptr::null() };
    for t in 0..tiles {
        let r = t * TILE_ROWS;
        let prefetch = Prefetch { next, phase: t, every: tiles };
        // SAFETY: rows r.. of `x` and `dst` exist (r < rows), the tile's count of them too.
        unsafe {
            let (x, dst, p) = (x.as_ptr().add(r * k), dst.add(r * dst_stride), panel.as_ptr());
            match rows - r {
                1 => tile::<1>(x, k, p, prefetch, dst, dst_stride, width),
                2 => tile::<2>(x, k, p, prefetch, dst, dst_stride, width),
                3 => tile::<3>(x, k, p, prefetch, dst, dst_stride, width),
                4 => tile::<4>(x, k, p, prefetch, dst, dst_stride, width),
                5 => tile::<5>(x, k, p, prefetch, dst, dst_stride, width),
                _ => tile::<TILE_ROWS>(x, k, p, prefetch, dst, dst_stride, width),
            }
        }
    }
}

/// Rows a tile computes at once: 6 × 2 vector sums, the two panel vectors and a broadcast fill
/// 15 of AVX2's 16 registers.
const TILE_ROWS: usize = 6;

/// Which rows of the next panel a tile asks for: those whose index is `phase` modulo `every`.
#[derive(Clone, Copy)]
struct Prefetch {
    next: *const f32,
    phase: usize,
    every: usize,
}

/// `R` rows of [`panel_product`].
///
/// # Safety
/// As [`panel_product`]: `x` holds `R` rows of `k`, `panel` `k` rows of [`PANEL`], `dst` `R` rows
/// of `width` `dst_stride` apart, `prefetch.next` null or `k` rows of [`PANEL`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const R: usize>(
    x: *const f32,
    k: usize,
    panel: *const f32,
    prefetch: Prefetch,
    dst: *mut f32,
    dst_stride: usize,
    width: usize,
) {
    use std::arch::x86_64::*;
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    // Counts down to the next row of `prefetch.next` to ask for; never reaches it when null.
    let mut countdown = if prefetch.next.is_null() { usize::MAX } else { prefetch.phase };
    for kk in 0..k {
        // SAFETY (this loop): kk < k, so every offset is inside the rows described above.
        unsafe {
            if countdown == 0 {
                _mm_prefetch::<_MM_HINT_T0>(prefetch.next.add(kk * PANEL).cast());
                countdown = prefetch.every;
            }
            countdown = countdown.wrapping_sub(1);
            let w0 = _mm256_loadu_ps(panel.add(kk * PANEL));
            let w1 = _mm256_loadu_ps(panel.add(kk * PANEL + 8));
            for (i, sum) in sums.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(i * k + kk));
                sum[0] = _mm256_fmadd_ps(xv, w0, sum[0]);
                sum[1] = _mm256_fmadd_ps(xv, w1, sum[1]);
            }
        }
    }
    for (i, sum) in sums.iter().enumerate() {
        // SAFETY: row i < R of `dst`, `width` values from its start.
        unsafe {
            let d = dst.add(i * dst_stride);
            if width == PANEL {
                _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), sum[0]));
                _mm256_storeu_ps(d.add(8), _mm256_add_ps(_mm256_loadu_ps(d.add(8)), sum[1]));
            } else {
                let mut both = [0f32; PANEL];
                _mm256_storeu_ps(both.as_mut_ptr(), sum[0]);
                _mm256_storeu_ps(both.as_mut_ptr().add(8), sum[1]);
                for (j, v) in both.iter().enumerate().take(width) {
                    *d.add(j) += v;
                }
            }
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
            with_team(threads, |team| {
                #[cfg(target_arch = "x86_64")]
                if has_avx2_and_fma() {
                    // SAFETY: AVX2 and FMA are present.
                    return unsafe { self.forward_avx2(texts, team, s) };
                }
                self.forward_body(texts, team, s)
            })
        })
    }

    /// [`Self::forward_body`] compiled for AVX2 and FMA. (Handed to the `pulp` crate's dispatch as a
    /// closure instead, the body was compiled for the baseline CPU: the closure reached the AVX2
    /// function through a `call_once` shim that is not inlined, and 4-lane SSE ran every step but the
    /// products.)
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_avx2(&self, texts: &[&[u32]], team: &Team, s: &mut Scratch) -> Vec<f32> {
        self.forward_body(texts, team, s)
    }

    /// The forward pass; inlined into its callers, so that its loops (embeddings, layer norms,
    /// attention, activation) are compiled for the CPU each of them is for.
    #[inline(always)]
    fn forward_body(&self, texts: &[&[u32]], team: &Team, s: &mut Scratch) -> Vec<f32> {
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
                    key_value.forward(&s.x, rows, &mut s.qkv, team);
                    gather_first_rows(&mut s.x, &lengths, h);
                    rows = texts.len();
                    cls_only = true;
                    query.forward(&s.x, rows, &mut s.query, team);
                    let (q, kv) = (Rows { data: &s.query, width: h }, Rows { data: &s.qkv, width: 2 * h });
                    attention(q, kv, 0, &lengths, self.heads, true, &mut s.context, &mut s.scores);
                }
                None => {
                    layer.qkv.forward(&s.x, rows, &mut s.qkv, team);
                    let (q, kv) = (Rows { data: &s.qkv, width: 3 * h }, Rows { data: &s.qkv, width: 3 * h });
                    attention(q, kv, h, &lengths, self.heads, false, &mut s.context, &mut s.scores);
                }
            }
            layer.attention_out.forward(&s.context, rows, &mut s.tmp, team);
            layer.attention_norm.apply(&mut s.tmp, Some(&s.x));
            std::mem::swap(&mut s.x, &mut s.tmp);
            layer.intermediate.forward(&s.x, rows, &mut s.inner, team);
            self.activation.apply_in_place(&mut s.inner);
            layer.output.forward(&s.inner, rows, &mut s.tmp, team);
            layer.output_norm.apply(&mut s.tmp, Some(&s.x));
            std::mem::swap(&mut s.x, &mut s.tmp);
        }
        if !cls_only {
            gather_first_rows(&mut s.x, &lengths, h);
        }
        // Pooler (tanh over [CLS]) and the classification head.
        self.pooler.forward(&s.x, texts.len(), &mut s.tmp, team);
        for v in &mut s.tmp {
            *v = v.tanh();
        }
        let mut logits = Vec::new();
        self.classifier.forward(&s.tmp, texts.len(), &mut logits, team);
        logits
    }
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

/// `out[i] = gelu(xs[i])`, vectorised for the CPU it runs on (the tensor path's inference GELU),
/// dispatched as the forward pass is ([`CpuBert::forward_avx2`]).
pub fn gelu_erf_into(xs: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_and_fma() {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { gelu_erf_into_avx2(xs, out) };
    }
    gelu_erf_loop(xs, out)
}

/// [`gelu_erf_loop`] compiled for AVX2 and FMA.
///
/// # Safety
/// AVX2 and FMA are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_erf_into_avx2(xs: &[f32], out: &mut [f32]) {
    gelu_erf_loop(xs, out)
}

#[inline(always)]
fn gelu_erf_loop(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = gelu_erf(x);
    }
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
            let w: Vec<f32> = (0..n_in * n_out).map(value).collect();
            let dense = Dense::from_in_out(&w, (0..n_out).map(|i| value(i + 3)).collect(), n_in, n_out);
            let x: Vec<f32> = (0..rows * n_in).map(|i| value(i + 11)).collect();
            let mut expected = vec![0f32; rows * n_out];
            for r in 0..rows {
                for o in 0..n_out {
                    let dot: f64 = (0..n_in).map(|i| x[r * n_in + i] as f64 * w[i * n_out + o] as f64).sum();
                    expected[r * n_out + o] = (dot + dense.b[o] as f64) as f32;
                }
            }
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut out = Vec::new();
                pool.install(|| with_team(threads, |team| dense.forward(&x, rows, &mut out, team)));
                assert_eq!(out.len(), expected.len());
                let worst = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{n_out} outputs on {threads} threads: worst difference {worst}");
            }
        }
    }

    /// Products of every row count a tile of six can leave (1 to 13 rows) and of more rows than
    /// a block of the input holds, widths that are and are not whole panels, one input to a
    /// few hundred: the panels give the triple loop's
    /// product, by the SIMD tiles (where the CPU has them) and by the portable path alike.
    #[test]
    fn a_product_over_panels_is_the_same_product_for_any_rows_and_width() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for n_in in [1, 7, 300] {
            for n_out in [5, 16, 37, 64] {
                let w: Vec<f32> = (0..n_in * n_out).map(|i| value(i + 5)).collect();
                let b: Vec<f32> = (0..n_out).map(|i| value(i + 3)).collect();
                let dense = Dense::from_in_out(&w, b.clone(), n_in, n_out);
                // 451 rows: blocks of the input of 218 rows for 300 inputs (`INPUT_BLOCK_BYTES`).
                for rows in (1..=13).chain([451]) {
                    let x: Vec<f32> = (0..rows * n_in).map(|i| value(i + 11)).collect();
                    let expected: Vec<f32> = (0..rows * n_out)
                        .map(|i| {
                            let (r, o) = (i / n_out, i % n_out);
                            let dot: f64 = (0..n_in).map(|k| x[r * n_in + k] as f64 * w[k * n_out + o] as f64).sum();
                            (dot + b[o] as f64) as f32
                        })
                        .collect();
                    let mut simd = Vec::new();
                    dense.forward(&x, rows, &mut simd, &Team::solo());
                    let mut portable = Vec::new();
                    for _ in 0..rows {
                        portable.extend_from_slice(&b);
                    }
                    for p in 0..n_out.div_ceil(PANEL) {
                        let panel = &dense.panels[p * PANEL * n_in..][..PANEL * n_in];
                        let width = PANEL.min(n_out - p * PANEL);
                        // SAFETY: `portable` holds rows × n_out values, this panel's columns from p · PANEL.
                        unsafe { dense.panel_portable(&x, rows, panel, portable.as_mut_ptr().add(p * PANEL), width) };
                    }
                    for (path, out) in [("simd", &simd), ("portable", &portable)] {
                        let worst = out.iter().zip(&expected).map(|(a, e)| (a - e).abs()).fold(0f32, f32::max);
                        assert!(worst < 1e-4, "{path}: {rows} × {n_in} by {n_in} × {n_out}: worst difference {worst}");
                    }
                }
                let (first, rest) = dense.split_outputs(n_out / 3);
                for o in 0..n_out {
                    let (part, col) = if o < n_out / 3 { (&first, o) } else { (&rest, o - n_out / 3) };
                    assert_eq!(part.weight(n_in - 1, col), w[(n_in - 1) * n_out + o], "split at {}", n_out / 3);
                }
            }
        }
    }

    /// The inference GELU as this CPU runs it (AVX2 and FMA) and as a CPU without them does: the
    /// same values (its accuracy against candle's is `bert`'s test).
    #[test]
    fn gelu_for_avx2_and_for_the_baseline_cpu_is_the_same() {
        let xs: Vec<f32> = (0..=2_001).map(|i| -10.0 + i as f32 * 1e-2).collect();
        let (mut dispatched, mut baseline) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        gelu_erf_into(&xs, &mut dispatched);
        gelu_erf_loop(&xs, &mut baseline);
        for ((x, a), b) in xs.iter().zip(&dispatched).zip(&baseline) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + x.abs()), "gelu({x}): {a} against {b}");
        }
        assert!(baseline[0].abs() < 1e-6 && (baseline[xs.len() - 1] - xs[xs.len() - 1]).abs() < 1e-3, "{baseline:?}");
    }

    /// A small model of made-up weights (hidden 24, 3 heads, 2 layers, feed-forward 40), the
    /// last layer's query split off as a served model's is.
    fn made_up_model() -> CpuBert {
        let mut next = 0usize;
        let mut values = |n: usize| -> Vec<f32> {
            next += n;
            (next - n..next).map(|i| ((i * 7919 % 1000) as f32 / 1000.0) - 0.5).collect()
        };
        let (h, inner, vocab, positions) = (24, 40, 50, 16);
        let mut dense = |n_in: usize, n_out: usize| {
            let w = values(n_in * n_out);
            Dense::from_in_out(&w, values(n_out), n_in, n_out)
        };
        let mut layers = Vec::new();
        for last in [false, true] {
            let qkv = dense(h, 3 * h);
            let query_and_key_value = last.then(|| qkv.split_outputs(h));
            layers.push(Layer {
                qkv,
                query_and_key_value,
                attention_out: dense(h, h),
                attention_norm: Norm { weight: vec![1.1; h], bias: vec![0.05; h], eps: 1e-12 },
                intermediate: dense(h, inner),
                output: dense(inner, h),
                output_norm: Norm { weight: vec![0.9; h], bias: vec![-0.05; h], eps: 1e-12 },
            });
        }
        let (pooler, classifier) = (dense(h, h), dense(h, 2));
        CpuBert {
            hidden: h,
            heads: 3,
            activation: Activation::GeluErf,
            word: values(vocab * h),
            position: values(positions * h),
            embedding_norm: Norm { weight: vec![1.0; h], bias: vec![0.0; h], eps: 1e-12 },
            layers,
            pooler,
            classifier,
        }
    }

    /// The forward pass this CPU runs (compiled for AVX2 and FMA) and the one a CPU without
    /// them runs (the same code for the baseline x86-64) give the same logits: the second is
    /// otherwise never run on the machines this is tested on.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_forward_pass_for_avx2_and_for_the_baseline_cpu_give_the_same_logits() {
        let model = made_up_model();
        let texts: Vec<Vec<u32>> =
            [1usize, 5, 16, 9].iter().map(|&n| (0..n as u32).map(|i| (i * 13 + 2) % 50).collect()).collect();
        let texts: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let baseline = model.forward_body(&texts, &Team::solo(), &mut Scratch::default());
        assert_eq!(baseline.len(), 2 * texts.len());
        assert!(baseline.iter().all(|v| v.is_finite()), "{baseline:?}");
        if !has_avx2_and_fma() {
            eprintln!("this CPU has no AVX2 and FMA: only the baseline pass was run");
            return;
        }
        // SAFETY: AVX2 and FMA are present.
        let avx2 = unsafe { model.forward_avx2(&texts, &Team::solo(), &mut Scratch::default()) };
        let worst = avx2.iter().zip(&baseline).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "worst difference {worst}: {avx2:?} against {baseline:?}");
        // And the logits are the texts': not the same row four times.
        assert!(baseline.chunks(2).any(|row| (row[0] - baseline[0]).abs() > 1e-3), "{baseline:?}");
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
