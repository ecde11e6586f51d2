//! BERT encoder, pooler and classification head with Hugging Face's tensor
//! names (`bert.embeddings.word_embeddings.weight`, …, `classifier.weight`).
//!
//! Written here rather than taken from `candle-transformers` because that
//! module's fused layer norm has no backward pass: fine-tuning through it
//! trains the head alone. In training mode every op below is differentiable
//! and dropout is active, drawing its masks from the caller's seeded RNG so
//! that a run is reproducible; in evaluation mode the fused kernels are used.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use rand::{rngs::StdRng, Rng};

use super::config::BertConfig;
use super::cpu::{self, Activation, CpuBert};

/// Evaluation (dropout off, fused kernels) or training (dropout on, every op differentiable).
pub enum Mode<'a> {
    /// Inference: deterministic, fast.
    Eval,
    /// Training: dropout masks come from this generator.
    Train(&'a mut StdRng),
}

impl Mode<'_> {
    fn training(&self) -> bool {
        matches!(self, Mode::Train(_))
    }

    /// Inverted dropout with a mask drawn from the seeded generator.
    fn dropout(&mut self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let Mode::Train(rng) = self else { return Ok(xs.clone()) };
        if p <= 0.0 {
            return Ok(xs.clone());
        }
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> =
            (0..xs.elem_count()).map(|_| if rng.random::<f64>() < keep { scale } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        if is_cpu_f32(xs) {
            return xs.contiguous()?.apply_op1(TimesConstant { constant: mask });
        }
        xs.mul(&mask)
    }
}

/// `xs * constant` element-wise, for a `constant` that takes no gradient
/// (a dropout mask). candle's `mul` differentiates both operands: for a
/// constant that is a product, a tensor of zeros and an add per call, thrown
/// away. Here only `xs` gets its gradient, `grad * constant` — candle's own
/// product for it —, and the forward is candle's `xs * constant`: the same
/// bits (tested, and the default model's version).
struct TimesConstant {
    constant: Tensor,
}

impl CustomOp1 for TimesConstant {
    fn name(&self) -> &'static str {
        "times-constant"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, "times-constant")?;
        let constant = self.constant.contiguous()?;
        let (c, c_layout) = constant.storage_and_layout();
        let c = storage_f32(&c, c_layout, "times-constant")?;
        if c.len() != xs.len() {
            candle_core::bail!("times-constant: {} constants for {} elements", c.len(), xs.len())
        }
        let out = xs.iter().zip(c).map(|(&x, &m)| x * m).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.mul(&self.constant)?))
    }
}

/// `scores + mask` with the additive attention `mask`, (batch, 1, 1, keys),
/// broadcast over heads and queries; only `scores` takes a gradient, for the
/// reason [`TimesConstant`] gives (candle's `broadcast_add` also builds the
/// mask's, as large as the scores). The same bits as `broadcast_add` (tested).
struct PlusMask {
    mask: Tensor,
}

impl CustomOp1 for PlusMask {
    fn name(&self) -> &'static str {
        "plus-mask"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let scores = contiguous_f32(storage, layout, "plus-mask")?;
        let (batch, _, _, keys) = layout.shape().dims4()?;
        let mask = self.mask.contiguous()?;
        let (m, m_layout) = mask.storage_and_layout();
        let m = storage_f32(&m, m_layout, "plus-mask")?;
        if m.len() != batch * keys {
            candle_core::bail!("plus-mask: a mask of {} for {batch} × {keys}", m.len())
        }
        let per_batch = scores.len() / batch;
        let mut out = Vec::with_capacity(scores.len());
        for (b, block) in scores.chunks_exact(per_batch).enumerate() {
            let row_mask = &m[b * keys..(b + 1) * keys];
            for row in block.chunks_exact(keys) {
                out.extend(row.iter().zip(row_mask).map(|(&s, &m)| s + m));
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.clone()))
    }
}

/// Layer norm whose training path is built from differentiable ops.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: vb.get(size, "bias")?, eps })
    }

    fn forward(&self, xs: &Tensor, mode: &Mode) -> Result<Tensor> {
        if !mode.training() {
            return candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32);
        }
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let scaled = normed.mul(&over_rows(&self.weight, &normed, mode)?)?;
        scaled.add(&over_rows(&self.bias, &scaled, mode)?)
    }
}

fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// A linear layer: candle's in evaluation; in training the same matrix
/// product, the bias added through [`over_rows`].
fn dense(layer: &Linear, xs: &Tensor, mode: &Mode) -> Result<Tensor> {
    let (true, Some(bias)) = (mode.training(), layer.bias()) else { return layer.forward(xs) };
    let w = layer.weight().t()?;
    let ys = match *xs.dims() {
        [b, s, k] if xs.is_contiguous() => xs.reshape((b * s, k))?.matmul(&w)?.reshape((b, s, ()))?,
        [_, _] => xs.matmul(&w)?,
        _ => return layer.forward(xs),
    };
    ys.add(&over_rows(bias, &ys, mode)?)
}

/// `param`, whose shape is the trailing dimensions of `like`'s, repeated over
/// `like`'s leading ones: the other operand of an element-wise op with `like`
/// (`broadcast_as`, a view, in evaluation).
///
/// In training `broadcast_as` would do too, but the backward pass of a broadcast sums
/// the gradient over the broadcast dimensions with a division per element
/// (its fast sum is over trailing dimensions only): over every bias and layer
/// norm that was a fifth of a training step. On the CPU in f32 the repetition
/// is [`RepeatRows`], whose backward pass sums the gradient's rows in the same
/// order — the same bits — without the divisions.
fn over_rows(param: &Tensor, like: &Tensor, mode: &Mode) -> Result<Tensor> {
    if mode.training() && is_cpu_f32(param) && param.elem_count() > 0 && like.dims().ends_with(param.dims()) {
        param.contiguous()?.apply_op1(RepeatRows { shape: like.shape().clone() })
    } else {
        param.broadcast_as(like.shape())
    }
}

/// A CPU f32 tensor copied `shape.elem_count() / len` times into `shape`; differentiable.
struct RepeatRows {
    shape: Shape,
}

impl CustomOp1 for RepeatRows {
    fn name(&self) -> &'static str {
        "repeat-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let row = contiguous_f32(storage, layout, "repeat-rows")?;
        let rows = self.shape.elem_count() / row.len();
        Ok((CpuStorage::F32(row.repeat(rows)), self.shape.clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        grad.contiguous()?.apply_op1_no_bwd(&SumRows { shape: arg.shape().clone() }).map(Some)
    }
}

/// The rows of a CPU f32 tensor (rows of `shape.elem_count()` elements)
/// summed, each column in row order, as candle's sum over leading dimensions
/// adds them.
struct SumRows {
    shape: Shape,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, "sum-rows")?;
        let mut sum = vec![0f32; self.shape.elem_count()];
        for row in data.chunks_exact(sum.len()) {
            for (s, x) in sum.iter_mut().zip(row) {
                *s += x;
            }
        }
        Ok((CpuStorage::F32(sum), self.shape.clone()))
    }
}

/// The elements of a contiguous CPU f32 tensor; `op` names the op that refuses anything else.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    f32_slice(storage, layout).ok_or_else(|| not_cpu_f32(op))
}

/// The elements of contiguous f32 CPU storage, or `None` for another dtype or a strided layout.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { return None };
    let (start, end) = layout.contiguous_offsets()?;
    Some(&data[start..end])
}

fn not_cpu_f32(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: contiguous f32 tensors on the CPU only"))
}

/// The activation on the tensor path: the fast CPU kernel in inference, candle's ops in training.
fn activate(activation: Activation, xs: &Tensor, mode: &Mode) -> Result<Tensor> {
    match activation {
        Activation::GeluErf if !mode.training() && is_cpu_f32(xs) => xs.contiguous()?.apply_op1_no_bwd(&GeluErfCpu),
        Activation::GeluErf if is_cpu_f32(xs) => xs.contiguous()?.apply_op1(GeluErfTrain::default()),
        Activation::GeluErf => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
        Activation::Relu => xs.relu(),
    }
}

/// [`cpu::gelu_erf_into`] as a candle op, for the tensor path's inference on the CPU.
struct GeluErfCpu;

impl CustomOp1 for GeluErfCpu {
    fn name(&self) -> &'static str {
        "gelu-erf-cpu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, "gelu-erf-cpu")?;
        let mut out = vec![0f32; data.len()];
        cpu::gelu_erf_into(data, &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// candle's `gelu_erf` for training on the CPU, forward and backward each in
/// one pass over the elements. candle differentiates `gelu_erf` with a chain
/// of twelve tensor ops (`backprop.rs`), each a pass and an allocation,
/// and computes erf twice; this op does the same arithmetic, operation for
/// operation and in the same order, per element, and keeps the forward's erf
/// for the backward (the same value: see [`GeluErfTrain::backward`]), so that
/// a seed's model stays the same to the bit (tested below, and by the default
/// model's version). One instance per call: it holds that call's erf.
#[derive(Default)]
struct GeluErfTrain {
    erf: std::sync::Mutex<Option<Vec<f32>>>,
}

impl GeluErfTrain {
    /// candle's `GeluErf::f32`, given `erf(x · (1/√2 as f32))` (libm's erf,
    /// computed by [`super::erf::erff_scaled`] to the same bits).
    fn forward(x: f32, erf: f32) -> f32 {
        (erf + 1.) * 0.5 * x
    }

    /// `grad · gelu'(x)` as candle's backward computes it, given the same erf
    /// of `x`: each `affine(mul, add)` is `x * mul + add` in f32 (so the
    /// `+ 0.0` terms stay), each scalar a candle `f64` cast to `f32`. candle
    /// takes the erf of `x * (1/√2 as f32) + 0.0`: the same f32 constant as
    /// the forward's (tested), and the `+ 0.0` only turns −0 into +0, whose
    /// erf the `* 0.5 + 0.0` after it turns into +0 either way.
    fn backward(x: f32, erf: f32, grad: f32) -> f32 {
        let neg_half_square = affine(-(x * x), 0.5, 0.);
        let scaled_exp_arg = affine(neg_half_square.exp(), 0.398942, 0.) * x;
        let erf_scaled_sqrt = affine(erf, 0.5, 0.);
        let gelu_erf_grad = affine(scaled_exp_arg, 1., 0.5) + erf_scaled_sqrt;
        grad * gelu_erf_grad
    }
}

impl CustomOp1 for GeluErfTrain {
    fn name(&self) -> &'static str {
        "gelu-erf-train"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, "gelu-erf-train")?;
        let erf = super::erf::erff_scaled(data, std::f32::consts::FRAC_1_SQRT_2);
        let out = data.iter().zip(&erf).map(|(&x, &e)| Self::forward(x, e)).collect();
        *self.erf.lock().unwrap_or_else(|e| e.into_inner()) = Some(erf);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (x, grad) = (arg.contiguous()?, grad_res.contiguous()?);
        let cached = self.erf.lock().unwrap_or_else(|e| e.into_inner()).take();
        let out: Vec<f32> = {
            let ((xs, xs_layout), (gs, gs_layout)) = (x.storage_and_layout(), grad.storage_and_layout());
            let (xs, gs) =
                (storage_f32(&xs, xs_layout, "gelu-erf-train")?, storage_f32(&gs, gs_layout, "gelu-erf-train")?);
            if xs.len() != gs.len() {
                candle_core::bail!("gelu-erf-train: {} gradients for {} inputs", gs.len(), xs.len())
            }
            let erf = match cached {
                Some(erf) if erf.len() == xs.len() => erf,
                _ => super::erf::erff_scaled(xs, std::f32::consts::FRAC_1_SQRT_2),
            };
            xs.iter().zip(&erf).zip(gs).map(|((&x, &e), &g)| Self::backward(x, e, g)).collect()
        };
        Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
    }
}

/// The elements of a contiguous f32 tensor's storage on the CPU; `op` names the op that refuses anything else.
fn storage_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    cpu_f32_slice(storage, layout).ok_or_else(|| not_cpu_f32(op))
}

/// The elements of a contiguous f32 tensor's storage on the CPU, or `None` for any other
/// (the optimiser then takes candle's ops).
pub(crate) fn cpu_f32_slice<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Option<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else { return None };
    f32_slice(cpu, layout)
}

/// Whether `t` takes the training path's own CPU kernels: f32 on the CPU.
fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// candle's `Tensor::affine(mul, add)` on one f32 element, as its CPU backend computes it:
/// `x * mul + add` with both scalars cast to f32 (so a `+ 0.0` stays: it turns −0 into +0).
/// What `tensor * f64`, `tensor + f64` and `tensor / f64` are in candle.
#[inline(always)]
pub(crate) fn affine(x: f32, mul: f64, add: f64) -> f32 {
    x * mul as f32 + add as f32
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let table = |rows: usize, name: &str| -> Result<Embedding> {
            Ok(Embedding::new(vb.pp(name).get((rows, h), "weight")?, h))
        };
        Ok(Self {
            word: table(cfg.vocab_size, "word_embeddings")?,
            position: table(cfg.max_position_embeddings, "position_embeddings")?,
            token_type: table(cfg.type_vocab_size, "token_type_embeddings")?,
            norm: LayerNorm::load(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, input_ids: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let (_, seq_len) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let types = input_ids.zeros_like()?;
        let words = self.word.forward(input_ids)?;
        let positions = over_rows(&self.position.forward(&positions)?, &words, mode)?;
        let xs = words.add(&positions)?.add(&self.token_type.forward(&types)?)?;
        let xs = self.norm.forward(&xs, mode)?;
        mode.dropout(&xs, self.dropout)
    }
}

struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// Inference only: query (pre-scaled by 1/√head_dim), key and value as one
    /// product, built by [`BertClassifier::fuse_for_inference`].
    fused_qkv: Option<Linear>,
    output: Linear,
    norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    attention_dropout: f64,
    hidden_dropout: f64,
}

impl Attention {
    fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        if !h.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {}", cfg.num_attention_heads);
        }
        let sa = vb.pp("self");
        let out = vb.pp("output");
        Ok(Self {
            query: linear(h, h, sa.pp("query"))?,
            key: linear(h, h, sa.pp("key"))?,
            value: linear(h, h, sa.pp("value"))?,
            fused_qkv: None,
            output: linear(h, h, out.pp("dense"))?,
            norm: LayerNorm::load(h, cfg.layer_norm_eps, out.pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
            attention_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
        })
    }

    /// Query (pre-scaled by 1/√head_dim), key and value as one weight, (3 × hidden, hidden), and one bias.
    fn fused_qkv_weights(&self) -> Result<(Tensor, Tensor)> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let bias =
            |l: &Linear| l.bias().cloned().ok_or_else(|| candle_core::Error::Msg("a projection without bias".into()));
        let weight =
            Tensor::cat(&[(self.query.weight() * scale)?, self.key.weight().clone(), self.value.weight().clone()], 0)?;
        let bias = Tensor::cat(&[(bias(&self.query)? * scale)?, bias(&self.key)?, bias(&self.value)?], 0)?;
        Ok((weight, bias))
    }

    /// `mask` is additive, shaped (batch, 1, 1, seq): 0 for tokens, a large negative for padding.
    fn forward(&self, xs: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let scores_of = |q: &Tensor, k: &Tensor| q.matmul(&k.t()?);
        let (scores, v) = match &self.fused_qkv {
            Some(qkv) if !mode.training() => {
                // One product, one copy into (3, batch, heads, seq, head_dim); q is already scaled.
                let all = qkv.forward(xs)?.reshape((b, s, 3, self.heads, self.head_dim))?;
                let all = all.permute((2, 0, 3, 1, 4))?.contiguous()?;
                (scores_of(&all.get(0)?, &all.get(1)?)?, all.get(2)?)
            }
            _ => {
                let q = split(dense(&self.query, xs, mode)?)?;
                let k = split(dense(&self.key, xs, mode)?)?;
                ((scores_of(&q, &k)? / (self.head_dim as f64).sqrt())?, split(dense(&self.value, xs, mode)?)?)
            }
        };
        let scores = if mode.training() && is_cpu_f32(&scores) {
            scores.contiguous()?.apply_op1(PlusMask { mask: mask.clone() })?
        } else {
            scores.broadcast_add(mask)?
        };
        let probs = if mode.training() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = mode.dropout(&probs, self.attention_dropout)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        let out = mode.dropout(&dense(&self.output, &context, mode)?, self.hidden_dropout)?;
        self.norm.forward(&(out + xs)?, mode)
    }
}

struct Layer {
    attention: Attention,
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    activation: Activation,
    dropout: f64,
}

impl Layer {
    fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            attention: Attention::load(cfg, vb.pp("attention"))?,
            intermediate: linear(h, i, vb.pp("intermediate").pp("dense"))?,
            output: linear(i, h, vb.pp("output").pp("dense"))?,
            norm: LayerNorm::load(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            activation: Activation::parse(&cfg.hidden_act)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let attended = self.attention.forward(xs, mask, mode)?;
        let inner = activate(self.activation, &dense(&self.intermediate, &attended, mode)?, mode)?;
        let out = mode.dropout(&dense(&self.output, &inner, mode)?, self.dropout)?;
        self.norm.forward(&(out + attended)?, mode)
    }
}

/// `BertForSequenceClassification`: encoder, tanh pooler over `[CLS]`, linear head.
pub struct BertClassifier {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pooler: Linear,
    classifier: Linear,
    dropout: f64,
}

impl BertClassifier {
    /// Builds the model from `vb`, whose root holds `bert.*` and `classifier.*`.
    pub fn load(cfg: &BertConfig, num_labels: usize, vb: VarBuilder) -> Result<Self> {
        let bert = vb.pp("bert");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(cfg, bert.pp("encoder").pp("layer").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings: Embeddings::load(cfg, bert.pp("embeddings"))?,
            layers,
            pooler: linear(cfg.hidden_size, cfg.hidden_size, bert.pp("pooler").pp("dense"))?,
            classifier: linear(cfg.hidden_size, num_labels, vb.pp("classifier"))?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    /// Prepares the evaluation path for serving: each layer's query, key and
    /// value projections become one matrix product (the query pre-scaled by
    /// 1/√head_dim), a copy of the weights taken now. Only for a model whose
    /// weights no longer change: the training path keeps using the separate,
    /// trainable projections, but a fused copy would not follow later updates.
    pub fn fuse_for_inference(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            let (weight, bias) = layer.attention.fused_qkv_weights()?;
            layer.attention.fused_qkv = Some(Linear::new(weight, Some(bias)));
        }
        Ok(())
    }

    /// The weights laid out for the CPU serving path ([`cpu`]), which
    /// computes the same logits as [`BertClassifier::forward`] in evaluation
    /// mode. Weights must be f32. Each part's tensors are dropped as soon as
    /// they are copied, so the weights are held twice only a part at a time.
    pub fn into_cpu(self) -> Result<CpuBert> {
        let Self { embeddings: e, layers, pooler, classifier, dropout: _ } = self;
        let dense = |l: &Linear| -> Result<cpu::Dense> {
            let bias = l.bias().ok_or_else(|| candle_core::Error::Msg("a dense layer without bias".into()))?;
            cpu::Dense::new(l.weight(), bias)
        };
        let norm = |n: &LayerNorm| cpu::Norm::new(&n.weight, &n.bias, n.eps);
        let hidden = e.word.embeddings().dim(1)?;
        let word = e.word.embeddings().flatten_all()?.to_vec1()?;
        let type_zero = e.token_type.embeddings().get(0)?;
        let position = e.position.embeddings().broadcast_add(&type_zero)?.flatten_all()?.to_vec1()?;
        let embedding_norm = norm(&e.norm)?;
        drop(e);
        let heads = layers.first().map_or(1, |l| l.attention.heads);
        let activation = layers.first().map_or(Activation::GeluErf, |l| l.activation);
        let count = layers.len();
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(l, layer)| {
                let a = &layer.attention;
                let (weight, qkv_bias) = a.fused_qkv_weights()?;
                let qkv = cpu::Dense::new(&weight, &qkv_bias)?;
                Ok(cpu::Layer {
                    query_and_key_value: (l + 1 == count).then(|| qkv.split_outputs(a.heads * a.head_dim)),
                    qkv,
                    attention_out: dense(&a.output)?,
                    attention_norm: norm(&a.norm)?,
                    intermediate: dense(&layer.intermediate)?,
                    output: dense(&layer.output)?,
                    output_norm: norm(&layer.norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuBert {
            hidden,
            heads,
            activation,
            word,
            position,
            embedding_norm,
            layers,
            pooler: dense(&pooler)?,
            classifier: dense(&classifier)?,
        })
    }

    /// The encoder's output, (batch, seq, hidden), for `input_ids` and `attention_mask`, both (batch, seq) u32.
    pub fn hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let dtype = self.pooler.weight().dtype();
        // 0 for tokens, -10000 for padding, shaped to broadcast over heads and query positions.
        let mask = attention_mask.to_dtype(dtype)?.affine(10_000.0, -10_000.0)?.unsqueeze(1)?.unsqueeze(1)?;
        let mut xs = self.embeddings.forward(input_ids, mode)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask, mode)?;
        }
        Ok(xs)
    }

    /// The word embedding table, (vocab, hidden): the masked-language-model head scores through it.
    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word.embeddings()
    }

    /// Logits shaped (batch, labels) for `input_ids` and `attention_mask`, both (batch, seq) u32.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let xs = self.hidden_states(input_ids, attention_mask, mode)?;
        // Contiguous: CUDA's matrix product takes no row stride other than the row's length.
        let cls = xs.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        let pooled = dense(&self.pooler, &cls, mode)?.tanh()?;
        let pooled = mode.dropout(&pooled, self.dropout)?;
        dense(&self.classifier, &pooled, mode)
    }
}

/// `BertForMaskedLM`'s prediction head (`cls.predictions.*`): dense, activation and layer norm, then
/// scores over the vocabulary through the word embedding table (tied, as Hugging Face ties it) plus a bias.
/// Used by `triagem pretrain` only; a classifier fine-tuned from the result does not carry it.
pub struct MaskedLmHead {
    dense: Linear,
    norm: LayerNorm,
    activation: Activation,
    bias: Tensor,
}

impl MaskedLmHead {
    /// Builds the head from `vb`, whose root holds `cls.predictions.*`.
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let transform = vb.pp("transform");
        Ok(Self {
            dense: linear(h, h, transform.pp("dense"))?,
            norm: LayerNorm::load(h, cfg.layer_norm_eps, transform.pp("LayerNorm"))?,
            activation: Activation::parse(&cfg.hidden_act)?,
            bias: vb.get(cfg.vocab_size, "bias")?,
        })
    }

    /// Vocabulary logits, (rows, vocab), for hidden states shaped (rows, hidden).
    pub fn forward(&self, hidden: &Tensor, word_embeddings: &Tensor, mode: &Mode) -> Result<Tensor> {
        let xs = self.norm.forward(&activate(self.activation, &dense(&self.dense, hidden, mode)?, mode)?, mode)?;
        let scores = xs.matmul(&word_embeddings.t()?)?;
        scores.add(&over_rows(&self.bias, &scores, mode)?)
    }
}

/// Turns a batch of token id rows (already padded to one length) into tensors.
pub fn batch_tensors(ids: &[Vec<u32>], masks: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let rows = ids.len();
    let len = ids.first().map_or(0, Vec::len);
    let flat_ids: Vec<u32> = ids.iter().flatten().copied().collect();
    let flat_mask: Vec<u32> = masks.iter().flatten().copied().collect();
    Ok((Tensor::from_vec(flat_ids, (rows, len), device)?, Tensor::from_vec(flat_mask, (rows, len), device)?))
}

/// Softmax over the last dimension, as plain rows.
pub fn probabilities(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rand::SeedableRng;

    use super::*;
    use crate::model::{read_config, TextEncoder};

    /// The training path's repeated parameters ([`over_rows`]) give the
    /// values and, bit for bit, the gradients candle's broadcast gives: the
    /// same model trains to the same weights either way. Rows of 21 × 7 and
    /// 7, added and multiplied, in several orders of magnitude so that a sum
    /// in another order would round differently.
    #[test]
    fn a_repeated_parameter_gets_a_broadcast_ones_gradient_bit_for_bit() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(3);
        let mut draw = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| rng.random::<f32>() * 10f32.powi((i % 7) as i32 - 3)).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (x, upstream) = (draw(&[3, 7, 7]), draw(&[3, 7, 7]));
        for param_shape in [vec![7], vec![7, 7]] {
            let param = candle_core::Var::from_tensor(&draw(&param_shape)).unwrap();
            type Op = fn(&Tensor, &Tensor) -> Result<Tensor>;
            for (name, op) in [("add", Tensor::add as Op), ("mul", Tensor::mul as Op)] {
                let run = |other: Tensor| {
                    let out = op(&x, &other).unwrap();
                    let grads = (&out * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
                    let grad = grads.get(param.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grad)
                };
                let mut train_rng = StdRng::seed_from_u64(0);
                let repeated = run(over_rows(param.as_tensor(), &x, &Mode::Train(&mut train_rng)).unwrap());
                let broadcast = run(param.as_tensor().broadcast_as(x.shape()).unwrap());
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&repeated.0), bits(&broadcast.0), "{name} {param_shape:?}: values");
                assert_eq!(bits(&repeated.1), bits(&broadcast.1), "{name} {param_shape:?}: gradient");
            }
        }
        // In evaluation nothing is copied: the parameter is broadcast as a view.
        let param = draw(&[7]);
        let view = over_rows(&param, &x, &Mode::Eval).unwrap();
        assert_eq!(view.dims(), x.dims());
        assert!(!view.is_contiguous());
    }

    /// The inference GELU (vectorised A&S erf, own exp) against candle's
    /// (libm's erf) on 20,001 points of [-10, 10], odd lengths included so
    /// the vector loop's remainder runs too.
    #[test]
    fn inference_gelu_matches_candles_gelu_erf() {
        let xs: Vec<f32> = (0..=20_000).map(|i| -10.0 + i as f32 * 1e-3).collect();
        for n in [xs.len(), 7, 1] {
            let t = Tensor::from_slice(&xs[..n], n, &Device::Cpu).unwrap();
            let ours: Vec<f32> = t.apply_op1_no_bwd(&GeluErfCpu).unwrap().to_vec1().unwrap();
            let reference: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
            for ((x, a), b) in xs.iter().zip(&ours).zip(&reference) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + x.abs()), "gelu({x}): {a} against candle's {b}");
            }
        }
    }

    /// The training GELU ([`GeluErfTrain`]) gives candle's `gelu_erf` values
    /// and gradients to the bit, on 4,001 points of [-10, 10] and the edges of
    /// libm's erf branches, ±0, tiny and large values among them.
    #[test]
    fn training_gelu_matches_candles_gelu_erf_to_the_bit() {
        assert_eq!((1. / 2f64.sqrt()) as f32, std::f32::consts::FRAC_1_SQRT_2, "backward's erf reuse");
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 5e-3).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, f32::MIN_POSITIVE, 30.0, -30.0, 1.1932, 1.7678, 8.4853, -8.4853]);
        let n = xs.len();
        let weights: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let run = |ours: bool| -> (Vec<u32>, Vec<u32>) {
            let x = candle_core::Var::from_vec(xs.clone(), n, &Device::Cpu).unwrap();
            let y = if ours { x.apply_op1(GeluErfTrain::default()) } else { x.gelu_erf() }.unwrap();
            value_and_gradient_bits(&x, &y, &Tensor::from_vec(weights.clone(), n, &Device::Cpu).unwrap())
        };
        assert_same_bits(run(true), run(false));
    }

    /// The bits of `y` and of the gradient of `Σ y · weights` with respect to `x`.
    fn value_and_gradient_bits(x: &candle_core::Var, y: &Tensor, weights: &Tensor) -> (Vec<u32>, Vec<u32>) {
        let grads = (y * weights).unwrap().sum_all().unwrap().backward().unwrap();
        let bits =
            |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
        (bits(y), bits(grads.get(x).unwrap()))
    }

    fn assert_same_bits(ours: (Vec<u32>, Vec<u32>), candle: (Vec<u32>, Vec<u32>)) {
        assert_eq!(ours.0, candle.0, "values");
        assert_eq!(ours.1, candle.1, "gradients");
    }

    /// The dropout product and the attention mask's sum ([`TimesConstant`],
    /// [`PlusMask`]) give candle's `mul` and `broadcast_add` values, and their
    /// input candle's gradient, to the bit.
    #[test]
    fn constant_operands_match_candles_ops_to_the_bit() {
        let (b, h, s) = (3, 2, 5);
        let values =
            |n: usize, k: usize| -> Vec<f32> { (0..n).map(|i| (((i * k) % 97) as f32 - 48.0) / 7.0).collect() };
        let mask = Tensor::from_vec(
            (0..b * s).map(|i| if i % 4 == 3 { -10_000f32 } else { 0.0 }).collect::<Vec<_>>(),
            (b, 1, 1, s),
            &Device::Cpu,
        )
        .unwrap();
        let dropout = Tensor::from_vec(
            (0..b * h * s * s).map(|i| if i % 3 == 0 { 0f32 } else { 1.0 / 0.9 }).collect::<Vec<_>>(),
            (b, h, s, s),
            &Device::Cpu,
        )
        .unwrap();
        let weights = Tensor::from_vec(values(b * h * s * s, 13), (b, h, s, s), &Device::Cpu).unwrap();
        let run = |ours: bool| -> (Vec<u32>, Vec<u32>) {
            let x = candle_core::Var::from_vec(values(b * h * s * s, 31), (b, h, s, s), &Device::Cpu).unwrap();
            let y = if ours {
                x.apply_op1(PlusMask { mask: mask.clone() })
                    .unwrap()
                    .apply_op1(TimesConstant { constant: dropout.clone() })
                    .unwrap()
            } else {
                x.broadcast_add(&mask).unwrap().mul(&dropout).unwrap()
            };
            value_and_gradient_bits(&x, &y, &weights)
        };
        assert_same_bits(run(true), run(false));
    }

    /// The training path (every op differentiable) and the inference path
    /// (fused layer norm, softmax and GELU) are two implementations of one
    /// model: with dropout off they must give the same logits.
    #[test]
    fn training_path_without_dropout_gives_the_inference_logits() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let mut cfg = read_config(&dir).unwrap();
        cfg.hidden_dropout_prob = 0.0;
        cfg.attention_probs_dropout_prob = 0.0;
        let labels = cfg.labels().unwrap();
        // SAFETY: a read-only fixture, mapped only while loading.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap()
        };
        let model = BertClassifier::load(&cfg, labels.len(), vb).unwrap();
        let encoder =
            TextEncoder::load(&dir.join("tokenizer.json"), cfg.max_position_embeddings, cfg.pad_token_id).unwrap();
        // Different lengths, so the shorter rows are padded and the mask matters.
        let texts = ["quero comprar uma geladeira", "meu pedido chegou quebrado e ninguém responde", "oi"];
        let encoded = encoder.encode(&texts).unwrap();
        let (ids, masks) = batch_tensors(&encoded.ids, &encoded.masks, &Device::Cpu).unwrap();

        let inference = model.forward(&ids, &masks, &mut Mode::Eval).unwrap().to_vec2::<f32>().unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let training = model.forward(&ids, &masks, &mut Mode::Train(&mut rng)).unwrap().to_vec2::<f32>().unwrap();

        let spread = inference
            .iter()
            .map(|row| row[0] - row[1])
            .fold((f32::MAX, f32::MIN), |(lo, hi), d| (lo.min(d), hi.max(d)));
        assert!(spread.1 - spread.0 > 0.1, "the fixture's logits barely depend on the text: {inference:?}");
        for (a, b) in inference.iter().flatten().zip(training.iter().flatten()) {
            assert!((a - b).abs() < 1e-4, "inference {inference:?} vs training {training:?}");
        }
        // Fusing the projections for serving changes the evaluation path only, not its logits.
        let mut model = model;
        model.fuse_for_inference().unwrap();
        let fused = model.forward(&ids, &masks, &mut Mode::Eval).unwrap().to_vec2::<f32>().unwrap();
        for (a, b) in inference.iter().flatten().zip(fused.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "unfused {inference:?} vs fused {fused:?}");
        }
        let mut rng = StdRng::seed_from_u64(0);
        let training_after = model.forward(&ids, &masks, &mut Mode::Train(&mut rng)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(training, training_after, "the training path must not use the fused copy");
    }

    /// The CPU serving path (src/model/cpu.rs) and the tensor path are two
    /// implementations of one model: the same logits for texts of different
    /// lengths (the tensor path pads and masks, the serving path does not),
    /// with each activation, one head or several, the batch split between 1,
    /// 2 or 3 threads.
    #[test]
    fn the_cpu_serving_path_gives_the_tensor_paths_logits() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let texts = [
            "quero comprar uma geladeira",
            "meu pedido chegou quebrado e ninguém responde no chat nem no telefone, o que eu faço agora?",
            "oi",
            "tem airfryer 5l?",
            "comprei semana passada e veio com defeito",
        ];
        for (act, heads) in [("gelu", 1), ("gelu", 4), ("gelu_new", 2), ("relu", 4)] {
            let mut cfg = read_config(&dir).unwrap();
            cfg.hidden_act = act.into();
            cfg.num_attention_heads = heads;
            // SAFETY: a read-only fixture, mapped only while loading.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap()
            };
            let mut model = BertClassifier::load(&cfg, 2, vb).unwrap();
            model.fuse_for_inference().unwrap();
            let encoder =
                TextEncoder::load(&dir.join("tokenizer.json"), cfg.max_position_embeddings, cfg.pad_token_id).unwrap();
            let encoded = encoder.encode(&texts).unwrap();
            let (ids, masks) = batch_tensors(&encoded.ids, &encoded.masks, &Device::Cpu).unwrap();
            let reference = model.forward(&ids, &masks, &mut Mode::Eval).unwrap().to_vec2::<f32>().unwrap();
            let cpu = model.into_cpu().unwrap();
            for threads in 1..=3 {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let served = pool.install(|| cpu.logits(&encoded.unpadded())).unwrap();
                for (a, b) in served.iter().flatten().zip(reference.iter().flatten()) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{act}, {heads} heads, {threads} threads: served {served:?} vs tensor path {reference:?}"
                    );
                }
            }
        }
    }

    /// Input the serving path cannot compute is an error naming the text, never a panic.
    #[test]
    fn the_cpu_serving_path_refuses_what_it_cannot_compute() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let cfg = read_config(&dir).unwrap();
        // SAFETY: a read-only fixture, mapped only while loading.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap()
        };
        let cpu = BertClassifier::load(&cfg, 2, vb).unwrap().into_cpu().unwrap();
        let long = vec![5u32; cfg.max_position_embeddings + 1];
        for (texts, says) in [
            (vec![&[2u32, 5, 3][..], &[][..]], "text 1 of the batch has no tokens"),
            (vec![&[2u32, 1_999_999, 3][..]], "token id 1999999 of text 0 is outside the model's vocabulary of 2000"),
            (vec![&long[..]], "text 0 of the batch has 129 tokens; the model takes at most 128"),
        ] {
            assert_eq!(cpu.logits(&texts).unwrap_err(), says);
        }
    }
}
