//! Gemma-2 decoder used as Sana's text encoder (`transformers.Gemma2Model`, no LM head).
//!
//! Contract: [`Gemma2Encoder::forward`] maps right-padded token ids `(B, L)` and their attention mask
//! `(B, L)` to the **normed last hidden state for every position** `(B, L, hidden)` in the model dtype —
//! what `Gemma2Model(ids, attention_mask=mask)[0]` returns. Weights are the safetensors of a saved bare
//! `Gemma2Model` (`embed_tokens.weight`, `layers.N.…`, `norm.weight`); a `model.` prefix is accepted.
//!
//! Numerics mirror transformers `models/gemma2/modeling_gemma2.py` (docs/sana-port-spec.md §1.4):
//! * embeddings × `tensor(sqrt(hidden), dtype=model dtype)`;
//! * RMSNorm in f32 with `(1 + w)` multiplied in f32, one cast back;
//! * RoPE (rotate-half) with cos/sin computed in f32 and cast to the model dtype;
//! * causal + key-padding mask (additive `f32::MIN`, so rows never turn NaN), sliding window on the
//!   layers `layer_types` marks `sliding_attention` (default: even layer indices, as transformers does);
//! * GQA, scores scaled by `query_pre_attn_scalar^-0.5`, softmax in f32;
//! * attention logit softcapping `tanh(s/cap)·cap` only for [`AttnImplementation::Eager`] (default);
//!   transformers 5.17's SDPA path silently drops it, so [`AttnImplementation::Sdpa`] does too;
//! * `gelu_pytorch_tanh` gated MLP.
//!
//! On CUDA in bf16 the element-wise work between the GEMMs runs fused (`kernels/gemma.cu`): q/k/v and
//! gate/up are one GEMM each (their weights are concatenated at load; the portable path reads row views of
//! them), RoPE writes the split heads, the softcap, mask and softmax are one pass, and each residual add
//! runs with the norm after it. The portable bodies below are the reference (`gpu-check` compares them).
//!
//! candle-transformers' `gemma2.rs` was the structural starting point; it returns last-token logits,
//! builds RoPE in bf16, has no padding mask and always softcaps, hence this separate encoder.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Activation, Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::ops::{linear_fastest as linear, merge_heads};

/// Which transformers attention implementation to reproduce (only softcapping differs).
///
/// Default `Eager`: transformers 4.42–4.44 forced it for Gemma2 and 5.24 (the fixture reference) defaults
/// to it again; 5.17 defaulted to `sdpa`, which drops the softcap (spec §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum AttnImplementation {
    /// `eager`: applies `attn_logit_softcapping`.
    #[default]
    #[serde(rename = "eager")]
    Eager,
    /// `sdpa` as in transformers 5.17: ignores `attn_logit_softcapping`.
    #[serde(rename = "sdpa")]
    Sdpa,
}

/// `rope_parameters` block of transformers ≥ 5 configs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// Serde mirror of transformers' `Gemma2Config` json (`models/gemma2/configuration_gemma2.py`); missing
/// keys take that class's defaults (see [`Config::default`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_activation: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub bos_token_id: Option<u32>,
    pub tie_word_embeddings: bool,
    /// transformers < 5 spelling; ≥ 5 writes `rope_parameters.rope_theta`.
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    /// Only `null` (no scaling) is supported; anything else fails at load.
    pub rope_scaling: Option<serde_json::Value>,
    pub attention_bias: bool,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: Option<usize>,
    /// `"sliding_attention"` / `"full_attention"` per layer; `None` = transformers' default pattern.
    pub layer_types: Option<Vec<String>>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    /// Only `None`/`false` (causal) is supported.
    pub use_bidirectional_attention: Option<bool>,
    /// Not written by `save_pretrained`; set it to match the reference run (spec §1.4 softcap ambiguity).
    #[serde(rename = "_attn_implementation")]
    pub attn_implementation: AttnImplementation,
}

impl Default for Config {
    /// transformers `Gemma2Config()` defaults (= gemma-2-2b).
    fn default() -> Self {
        Self {
            vocab_size: 256000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            hidden_activation: Activation::GeluPytorchTanh,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-6,
            pad_token_id: Some(0),
            eos_token_id: Some(TokenIds::One(1)),
            bos_token_id: Some(2),
            tie_word_embeddings: true,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            query_pre_attn_scalar: 256.0,
            sliding_window: Some(4096),
            layer_types: None,
            final_logit_softcapping: Some(30.0),
            attn_logit_softcapping: Some(50.0),
            use_bidirectional_attention: None,
            attn_implementation: AttnImplementation::Eager,
        }
    }
}

impl Config {
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Whether layer `i` uses the sliding-window mask (transformers: `(i + 1) % 2 == 1`, i.e. even `i`).
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(t) => t.get(i).is_some_and(|s| s == "sliding_attention"),
            None => i.is_multiple_of(2),
        }
    }

    /// The softcap value the attention applies for the configured implementation.
    pub fn effective_attn_softcap(&self) -> Option<f64> {
        match self.attn_implementation {
            AttnImplementation::Eager => self.attn_logit_softcapping,
            AttnImplementation::Sdpa => None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            candle_core::bail!(
                "gemma2: num_attention_heads {} not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            candle_core::bail!("gemma2: head_dim {} must be even for RoPE", self.head_dim);
        }
        if self.use_bidirectional_attention == Some(true) {
            candle_core::bail!("gemma2: use_bidirectional_attention=true is not supported");
        }
        if let Some(s) = &self.rope_scaling {
            if !s.is_null() {
                candle_core::bail!("gemma2: rope_scaling {s} is not supported");
            }
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
        {
            if t != "default" {
                candle_core::bail!("gemma2: rope_type {t} is not supported");
            }
        }
        if let Some(t) = &self.layer_types {
            if t.len() != self.num_hidden_layers {
                candle_core::bail!(
                    "gemma2: {} layer_types for {} layers",
                    t.len(),
                    self.num_hidden_layers
                );
            }
        }
        Ok(())
    }
}

/// Gemma RMSNorm: `x * rsqrt(mean(x²) + eps) * (1 + w)` in f32, cast back to the input dtype.
#[derive(Debug, Clone)]
struct RmsNorm {
    /// `1 + w` in f32.
    scale: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        // Load in the model dtype first so a bf16 model sees the same rounded weights as torch's `.float()`.
        let w = vb.get(dim, "weight")?.to_dtype(DType::F32)?;
        Ok(Self {
            scale: (w + 1.0)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::ops::rms_norm(&x32, &self.scale, self.eps)?.to_dtype(dtype)
    }
}

/// RoPE tables `(max_pos, head_dim/2)` computed in f32, stored in the model dtype.
#[derive(Debug, Clone)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &Config, dtype: DType, dev: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let base = cfg.rope_theta() as f32;
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), all f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), dev)?.to_dtype(dtype)?,
        })
    }

    /// The tables' rows for positions `start..start + len`.
    fn rows(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }

    /// Rotates `(B, heads, L, d)` for positions `start..start + L`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (cos, sin) = self.rows(start, x.dim(2)?)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
    }
}

fn load_linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// Linears of one input stacked into one (`(Σ out, in)` weight, one GEMM), and each part as a row view of
/// it (no copy): `(stacked, parts)`. The parts are read and stacked on the host, then uploaded once: on
/// CUDA, stacking them on the device and freeing them left the stream-ordered pool 0.3 GiB larger for
/// Gemma-2 2B (measured on an H100, 2026-12-07).
fn load_stacked(
    in_dim: usize,
    parts: &[(&str, usize)],
    bias: bool,
    vb: &VarBuilder,
) -> Result<(Linear, Vec<Linear>)> {
    let host = vb.clone().set_device(Device::Cpu);
    let loaded = parts
        .iter()
        .map(|(name, out)| load_linear(in_dim, *out, bias, host.pp(*name)))
        .collect::<Result<Vec<_>>>()?;
    let stack = |ts: Vec<Tensor>| Tensor::cat(&ts, 0)?.to_device(vb.device());
    let w = stack(loaded.iter().map(|l| l.weight().clone()).collect())?;
    let b = if bias {
        let bs = loaded
            .iter()
            .map(|l| l.bias().cloned())
            .collect::<Option<Vec<_>>>();
        Some(stack(bs.unwrap_or_default())?)
    } else {
        None
    };
    drop(loaded);
    let mut views = Vec::with_capacity(parts.len());
    let mut at = 0;
    for (_, out) in parts {
        let part_b = b.as_ref().map(|b| b.narrow(0, at, *out)).transpose()?;
        views.push(Linear::new(w.narrow(0, at, *out)?, part_b));
        at += out;
    }
    Ok((Linear::new(w, b), views))
}

#[derive(Debug, Clone)]
struct Attention {
    /// q|k|v stacked (the fused path's one GEMM); `q_proj`, `k_proj`, `v_proj` are row views of it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    qkv: Linear,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, nh, nkv, d) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let bias = cfg.attention_bias;
        let parts = [("q_proj", nh * d), ("k_proj", nkv * d), ("v_proj", nkv * d)];
        let (qkv, views) = load_stacked(h, &parts, bias, &vb)?;
        let [q_proj, k_proj, v_proj]: [Linear; 3] = views
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gemma2: q/k/v views".into()))?;
        Ok(Self {
            qkv,
            q_proj,
            k_proj,
            v_proj,
            o_proj: load_linear(nh * d, h, bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.effective_attn_softcap(),
        })
    }

    /// `x (B, L, hidden)` at positions `P..P + L` after the `P` positions of `past` (keys and values
    /// `(1, nkv, P, d)`, none: `P = 0`), `mask (B, 1, L, P + L)` additive f32 → `(B, L, hidden)` and this
    /// call's own rotated keys and values `(B, nkv, L, d)`.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rope: &Rotary,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, _, _) = x.dims3()?;
        let start = match past {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        let (q, k, v) = self.project(x, rope, start)?;
        let (k_all, v_all) = match past {
            Some((pk, pv)) => {
                let with_past = |p: &Tensor, t: &Tensor| {
                    let (_, nkv, len, d) = p.dims4()?;
                    // cat on dim 2 leaves a strided result; the attention GEMMs want rows.
                    Tensor::cat(&[&p.broadcast_as((b, nkv, len, d))?, t], 2)?.contiguous()
                };
                (with_past(pk, &k)?, with_past(pv, &v)?)
            }
            None => (k.clone(), v.clone()),
        };
        // On CUDA with batch invariance on (`ops::set_batch_invariant`), one batch row at a time: cuBLAS
        // picks its batched-GEMM kernel by the batch count, so B rows at once would not sum like one.
        let out = if b > 1 && x.device().is_cuda() && crate::ops::batch_invariant() {
            let rows = (0..b)
                .map(|i| {
                    self.attend(
                        &q.narrow(0, i, 1)?,
                        &k_all.narrow(0, i, 1)?,
                        &v_all.narrow(0, i, 1)?,
                        &mask.narrow(0, i, 1)?,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            self.attend(&q, &k_all, &v_all, mask)?
        };
        Ok((linear(&self.o_proj, &merge_heads(&out)?, None)?, (k, v)))
    }

    /// Projections and RoPE at positions `start..start + L`: `x (B, L, hidden)` → `q (B, nh, L, d)`, `k`,
    /// `v (B, nkv, L, d)`, contiguous.
    fn project(&self, x: &Tensor, rope: &Rotary, start: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        #[cfg(feature = "cuda")]
        if crate::ops::fused(x) && x.dtype() == DType::BF16 && rope.cos.dtype() == DType::BF16 {
            let qkv = linear(&self.qkv, &x.contiguous()?, None)?;
            let (cos, sin) = rope.rows(start, l)?;
            return crate::kernels::gemma_rope_split(&qkv, &cos, &sin, nh, nkv, d);
        }
        // (B, L, heads·d) -> (B, heads, L, d)
        let q = linear(&self.q_proj, x, None)?
            .reshape((b, l, nh, d))?
            .transpose(1, 2)?;
        let k = linear(&self.k_proj, x, None)?
            .reshape((b, l, nkv, d))?
            .transpose(1, 2)?;
        let v = linear(&self.v_proj, x, None)?
            .reshape((b, l, nkv, d))?
            .transpose(1, 2)?;
        Ok((
            rope.apply(&q, start)?,
            rope.apply(&k, start)?,
            v.contiguous()?,
        ))
    }

    /// Softcapped softmax attention of `q (B, nh, Lq, d)` over `k`, `v (B, nkv, Lk, d)` with additive f32
    /// `mask (B, 1, Lq, Lk)` → `(B, nh, Lq, d)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, nh, l, d) = q.dims4()?;
        let nkv = self.num_kv_heads;
        let groups = nh / nkv;
        // GQA without repeating K/V: query head h uses kv head h / groups, so the `groups` query heads
        // of one kv head are adjacent: (B, nh, Lq, d) -> (B, nkv, groups·Lq, d).
        let q = q.reshape((b, nkv, groups * l, d))?;
        let scores = q.matmul(&k.t()?)?; // (B, nkv, groups·Lq, Lk)
        let probs = softcap_softmax(&scores, mask, nh, self.scale, self.softcap)?;
        probs.matmul(v)?.reshape((b, nh, l, d)) // (B, nkv, groups·Lq, d) -> (B, nh, Lq, d)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate|up stacked (the fused path's one GEMM); `gate_proj`, `up_proj` are row views of it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    gate_up: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn load(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (gate_up, views) = load_stacked(h, &[("gate_proj", i), ("up_proj", i)], false, &vb)?;
        let [gate_proj, up_proj]: [Linear; 2] = views
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gemma2: gate/up views".into()))?;
        Ok(Self {
            gate_up,
            gate_proj,
            up_proj,
            down_proj: load_linear(i, h, false, vb.pp("down_proj"))?,
            act: cfg.hidden_activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::ops::fused(x)
            && x.dtype() == DType::BF16
            && self.act == Activation::GeluPytorchTanh
            && self.down_proj.weight().dim(1)?.is_multiple_of(8)
        {
            let gu = linear(&self.gate_up, &x.contiguous()?, None)?;
            return linear(&self.down_proj, &crate::kernels::gemma_gelu_mul(&gu)?, None);
        }
        let gate = linear(&self.gate_proj, x, None)?.apply(&self.act)?;
        let up = linear(&self.up_proj, x, None)?;
        linear(&self.down_proj, &(gate * up)?, None)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    sliding: bool,
}

impl DecoderLayer {
    fn load(cfg: &Config, idx: usize, vb: VarBuilder) -> Result<Self> {
        let norm = |name: &str| RmsNorm::load(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            self_attn: Attention::load(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::load(cfg, vb.pp("mlp"))?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding: cfg.is_sliding(idx),
        })
    }

    /// The residual stream `x` and its input-normed `h` (this layer's `input_layernorm` of `x`) → the next
    /// residual stream, `next` (the next layer's input norm, or the final norm) of it, and the layer's
    /// keys and values of these positions (after `past`'s, see [`Attention::forward`]).
    fn forward(
        &self,
        x: &Tensor,
        h: &Tensor,
        mask: &Tensor,
        rope: &Rotary,
        next: &RmsNorm,
        past: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor, (Tensor, Tensor))> {
        let (a, kv) = self.self_attn.forward(h, mask, rope, past)?;
        let (x, h) = norm_residual(
            &a,
            Some(x),
            &self.post_attention_layernorm,
            Some(&self.pre_feedforward_layernorm),
        )?;
        let m = self.mlp.forward(&h)?;
        let (x, h) = norm_residual(&m, Some(&x), &self.post_feedforward_layernorm, Some(next))?;
        Ok((x, h, kv))
    }
}

/// `res + a(h)` (just `a(h)` without `res`): the residual stream `x`; and `b(x)` (`x` itself without `b`).
/// On CUDA in bf16 one kernel (`gemma_norm`) with the unfused ops' roundings.
fn norm_residual(
    h: &Tensor,
    res: Option<&Tensor>,
    a: &RmsNorm,
    b: Option<&RmsNorm>,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if crate::ops::fused(h)
        && h.dtype() == DType::BF16
        && b.is_none_or(|b| b.eps == a.eps)
        && crate::kernels::gemma_norm_fits(h.dim(candle_core::D::Minus1)?)
    {
        let (x, hb) = crate::kernels::gemma_norm(h, res, &a.scale, b.map(|b| &b.scale), a.eps)?;
        let hb = hb.unwrap_or_else(|| x.clone());
        return Ok((x, hb));
    }
    let n = a.forward(h)?;
    let x = match res {
        Some(r) => (r + n)?,
        None => n,
    };
    let hb = match b {
        Some(b) => b.forward(&x)?,
        None => x.clone(),
    };
    Ok((x, hb))
}

/// Eager attention weights: `softmax(cap·tanh(s·scale/cap) + mask)` (no cap when `softcap` is `None`) of the
/// model-dtype scores `(B, nkv, groups·Lq, Lk)` (`heads` = nkv·groups query heads), in f32, cast back to
/// the scores' dtype; `mask` `(B, 1, Lq, Lk)` additive f32. On CUDA in bf16 one kernel (`gemma_softmax`).
fn softcap_softmax(
    scores: &Tensor,
    mask: &Tensor,
    heads: usize,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::ops::fused(scores) && scores.dtype() == DType::BF16 {
        return crate::kernels::gemma_softmax(
            &scores.contiguous()?,
            &mask.contiguous()?,
            heads,
            scale,
            softcap,
        );
    }
    let (b, nkv, gl, lk) = scores.dims4()?;
    let lq = gl * nkv / heads;
    let s = (scores.to_dtype(DType::F32)? * scale)?;
    let s = match softcap {
        Some(cap) => ((s / cap)?.tanh()? * cap)?,
        None => s,
    };
    let s = s.reshape((b, heads, lq, lk))?.broadcast_add(mask)?;
    candle_nn::ops::softmax_last_dim(&s)?
        .to_dtype(scores.dtype())?
        .reshape((b, nkv, gl, lk))
}

/// Builds the additive `(B, 1, L, L)` f32 mask: 0 where query `q` may see key `k` (`k ≤ q`, key not
/// padding, and `q − k < window` if a window is given), `f32::MIN` elsewhere (torch uses `finfo.min`).
pub fn additive_mask(
    key_valid: &[Vec<bool>],
    window: Option<usize>,
    dev: &Device,
) -> Result<Tensor> {
    let l = key_valid.first().map_or(0, Vec::len);
    additive_mask_last(key_valid, l, window, dev)
}

/// [`additive_mask`] for the last `queries` of the `Lk` positions only: `(B, 1, queries, Lk)`, query `i`
/// at position `Lk − queries + i` (the tokens after a cached prefix).
pub fn additive_mask_last(
    key_valid: &[Vec<bool>],
    queries: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Tensor> {
    let b = key_valid.len();
    let l = key_valid.first().map_or(0, Vec::len);
    if queries > l {
        candle_core::bail!("gemma2: {queries} queries for {l} positions");
    }
    let first = l - queries;
    let mut m = vec![f32::MIN; b * queries * l];
    for (bi, valid) in key_valid.iter().enumerate() {
        if valid.len() != l {
            candle_core::bail!("gemma2: ragged attention mask");
        }
        for qi in 0..queries {
            let q = first + qi;
            let row = &mut m[(bi * queries + qi) * l..(bi * queries + qi + 1) * l];
            for (k, slot) in row.iter_mut().enumerate().take(q + 1) {
                let in_window = window.is_none_or(|w| q - k < w);
                if valid[k] && in_window {
                    *slot = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, queries, l), dev)
}

/// What Gemma-2 computes for a fixed run of leading tokens (one sequence of `P`, all real): every layer's
/// rotated keys and values `(1, nkv, P, d)` and the final-normed hidden states `(1, P, hidden)`. Attention
/// is causal, so positions `0..P` of any sequence that starts with these tokens get exactly these values,
/// and [`Gemma2Encoder::forward_after`] runs only the positions after them. Built by
/// [`Gemma2Encoder::prefill`] with the encoder's current kernels.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    ids: Vec<u32>,
    kv: Vec<(Tensor, Tensor)>,
    hidden: Tensor,
}

impl PrefixCache {
    /// The prefix's token ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The prefix's length `P`.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Final-normed hidden states of the prefix's positions, `(1, P, hidden)`.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }
}

/// Gemma-2 encoder: `Gemma2Model` without LM head; see the module docs for the exact semantics.
#[derive(Debug, Clone)]
pub struct Gemma2Encoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: Rotary,
    /// `sqrt(hidden)` as a 0-d tensor in the model dtype (rounded like transformers' `normalizer`).
    normalizer: Tensor,
    sliding_window: Option<usize>,
    max_positions: usize,
    hidden_size: usize,
    dtype: DType,
    device: Device,
}

impl Gemma2Encoder {
    /// Loads from a `VarBuilder` over a saved bare `Gemma2Model` (or one with a `model.` prefix).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let vb = if !vb.contains_tensor("embed_tokens.weight")
            && vb.contains_tensor("model.embed_tokens.weight")
        {
            vb.pp("model")
        } else {
            vb
        };
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let embed = vb
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(cfg, i, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let normalizer = Tensor::new((cfg.hidden_size as f64).sqrt(), &device)?.to_dtype(dtype)?;
        Ok(Self {
            embed_tokens: Embedding::new(embed, cfg.hidden_size),
            layers,
            norm: RmsNorm::load(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            rope: Rotary::new(cfg, dtype, &device)?,
            normalizer,
            sliding_window: cfg.sliding_window,
            max_positions: cfg.max_position_embeddings,
            hidden_size: cfg.hidden_size,
            dtype,
            device,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `input_ids (B, L)` u32, `attention_mask (B, L)` (any numeric dtype, nonzero = real token) →
    /// normed last hidden state `(B, L, hidden)` in the model dtype, every position (pads included, finite).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Ok(self.run(input_ids, attention_mask, None, false)?.0)
    }

    /// Runs the prefix `ids` (one sequence, every token real) once for [`Self::forward_after`].
    pub fn prefill(&self, ids: &[u32]) -> Result<PrefixCache> {
        if ids.is_empty() {
            candle_core::bail!("gemma2: empty prefix");
        }
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device)?;
        let (hidden, kv) = self.run(&t, &t.ones_like()?, None, true)?;
        Ok(PrefixCache {
            ids: ids.to_vec(),
            kv,
            hidden,
        })
    }

    /// [`Self::forward`] of sequences that start with `prefix`'s tokens, given only the tokens after them:
    /// `input_ids (B, S)`, `attention_mask (B, S)` → `(B, S, hidden)` for positions `P..P + S`.
    pub fn forward_after(
        &self,
        prefix: &PrefixCache,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        if prefix.kv.len() != self.layers.len() {
            candle_core::bail!(
                "gemma2: prefix of {} layers for {}",
                prefix.kv.len(),
                self.layers.len()
            );
        }
        Ok(self.run(input_ids, attention_mask, Some(prefix), false)?.0)
    }

    /// The decoder stack on `input_ids (B, L)` after `prefix` (if any): the final-normed hidden states and,
    /// with `keep_kv`, every layer's keys and values of these positions (else none are kept).
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        prefix: Option<&PrefixCache>,
        keep_kv: bool,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let (b, l) = input_ids.dims2()?;
        if attention_mask.dims2()? != (b, l) {
            candle_core::bail!(
                "gemma2: attention_mask {:?} does not match input_ids {:?}",
                attention_mask.shape(),
                input_ids.shape()
            );
        }
        let p = prefix.map_or(0, PrefixCache::len);
        if p + l > self.max_positions {
            candle_core::bail!(
                "gemma2: {} tokens exceed max_position_embeddings {}",
                p + l,
                self.max_positions
            );
        }
        // Keys: the prefix's (all real), then these positions'.
        let key_valid: Vec<Vec<bool>> = attention_mask
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| {
                std::iter::repeat_n(true, p)
                    .chain(row.into_iter().map(|v| v != 0.0))
                    .collect()
            })
            .collect();
        let full_mask = additive_mask_last(&key_valid, l, None, &self.device)?;
        let sliding_mask = match self.sliding_window {
            Some(w) if w < p + l && self.layers.iter().any(|layer| layer.sliding) => {
                additive_mask_last(&key_valid, l, Some(w), &self.device)?
            }
            _ => full_mask.clone(),
        };
        let x = self
            .embed_tokens
            .forward(&input_ids.to_dtype(DType::U32)?)?;
        let mut x = x.broadcast_mul(&self.normalizer)?;
        let Some(first) = self.layers.first() else {
            return Ok((self.norm.forward(&x)?, Vec::new()));
        };
        let mut h = norm_residual(&x, None, &first.input_layernorm, None)?.0;
        let mut kvs = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let mask = if layer.sliding {
                &sliding_mask
            } else {
                &full_mask
            };
            let next = self
                .layers
                .get(i + 1)
                .map_or(&self.norm, |n| &n.input_layernorm);
            let past = prefix.map(|p| &p.kv[i]);
            let kv;
            (x, h, kv) = layer.forward(&x, &h, mask, &self.rope, next, past)?;
            if keep_kv {
                kvs.push(kv);
            }
        }
        Ok((h, kvs))
    }
}

#[cfg(test)]
pub(crate) mod tests;
