//! Prompt → caption embeddings for both Sana pipelines (docs/sana-port-spec.md §1.5).
//!
//! Mirrors diffusers 0.42.1 `pipeline_sana.py::_get_gemma_prompt_embeds` + `encode_prompt`:
//! 1. `prompt.lower().strip()` with Python's definitions ([`python_lower_strip`]);
//! 2. positive prompts get the complex-human-instruction prefix ([`complex_human_instruction`]),
//!    `n_chi = len(tokenizer.encode(chi))` (BOS included) and `L = n_chi + 300 − 2`; negative prompts
//!    have no prefix and `L = 300`;
//! 3. `tokenizer(text, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)`
//!    with right padding/truncation: the text is truncated to `L − (special tokens)` tokens, then the
//!    tokenizer's own post-processor adds its special tokens (`<bos>` for Gemma), then pads with `<pad>`;
//! 4. Gemma-2 on all `L` tokens, then rows `[0] + [L−299, L)` (BOS + the last 299; identity when `L = 300`).
//!
//! Every positive prompt starts with the same instruction tokens, and Gemma-2 is causal, so what it computes
//! for them does not depend on the prompt. [`TextEncoder`] runs the instruction's first `n_chi − 1` tokens
//! once at construction ([`PrefixCache`]) and then only the `L − n_chi + 1 = 299` positions after them: row 0
//! comes from the cache and rows `[n_chi − 1, L)` are exactly the computed ones. That is 35 % fewer rows
//! through every layer (459 → 299). The last instruction token is left out of the cache because it can
//! merge with the prompt's first characters; a prompt whose tokens do not start with the cached ones
//! (checked per prompt) goes through the whole sequence as before.
//!
//! Padding is trimmed too. Tokens are right-padded, so a prompt's real tokens come first and, Gemma-2 being
//! causal, what it computes for them does not depend on the padding after them. [`TextEncoder::encode_prompts`]
//! runs each prompt only up to its last real token, rounded up to [`TRIM_BUCKET`] positions, and returns
//! zeros in the kept rows after that. Those rows are padding (mask 0): the transformer gives them the weight
//! `exp(−10000 + …)`, exactly 0 in f32, so it computes the same with zeros there as with Gemma-2's values
//! (`transformer::tests::masked_caption_tokens_do_not_influence_output`). A typical prompt of a few dozen
//! tokens runs 64 positions after the instruction instead of 299, and the empty negative prompt 64 of 300.
//! With batch invariance on (the default, `sana::batch`) every prompt runs through Gemma-2 in a call of its
//! own, exactly as alone, and Gemma-2's linears take the fastest algorithm for the call's few rows
//! (`ops::linear_fastest`: split-K allowed); off, prompts with the same start and run length share one call.
//! `encode_with(.., trim = false)` is diffusers' whole computation, every padding row included.
//!
//! The empty negative prompt (diffusers' default, and what most base requests send) is encoded once at
//! construction; a negative prompt whose tokens are its tokens takes those rows without running Gemma-2.
//! The cached rows are the trimmed computation of that prompt alone, which is what a call with it computes
//! (one prompt per call: the same shapes, the same algorithms), so a request gets the same bits either way.
//!
//! [`TextEncoder`] is immutable after construction (`Send + Sync`), so one instance can be shared by
//! both pipelines behind an `Arc`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

use super::gemma2::{Gemma2Encoder, PrefixCache};
use super::PipelineError;

/// Caption length seen by the transformer (`max_sequence_length` in diffusers).
pub const MAX_SEQUENCE_LENGTH: usize = 300;

/// With trimming (module docs), the positions a prompt runs through Gemma-2 are rounded up to a multiple
/// of this: prompts of similar length run at the same GEMM shapes (and, with batch invariance off, share
/// one call).
pub const TRIM_BUCKET: usize = 64;

/// diffusers' default `complex_human_instruction` (SanaPipeline and SanaSprintPipeline `__call__`).
pub const COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// The instruction lines joined with `"\n"`, as diffusers prepends them (1057 characters).
pub fn complex_human_instruction() -> String {
    COMPLEX_HUMAN_INSTRUCTION.join("\n")
}

/// Python's `str.isspace()` for one code point: Unicode `White_Space` plus U+001C..U+001F (which CPython
/// treats as whitespace because their bidi class is B/S). Rust's `char::is_whitespace` lacks those four.
pub fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `text.lower().strip()`. Rust's `to_lowercase` applies the same full Unicode mapping
/// (SpecialCasing, e.g. `İ` → `i̇`, and the final-sigma rule) as CPython's `str.lower`.
pub fn python_lower_strip(text: &str) -> String {
    text.to_lowercase()
        .trim_matches(is_python_whitespace)
        .to_string()
}

/// Token ids and attention mask, each `B` rows of the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

/// Gemma tokenizer + Gemma-2 encoder; turns prompts into `(B, 300, hidden)` caption embeddings + mask.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    encoder: Gemma2Encoder,
    pad_id: u32,
    chi: String,
    /// Tokens of the CHI prefix, BOS included (`len(tokenizer.encode(chi))`).
    n_chi: usize,
    /// Special tokens the post-processor adds to a single sequence (1 for Gemma's `<bos> $A`).
    n_special: usize,
    /// Gemma-2 run once on the instruction's first `n_chi − 1` tokens (see the module docs); none when the
    /// instruction is a single token.
    prefix: Option<PrefixCache>,
    /// The empty negative prompt (diffusers' default, sent by most base requests) encoded once at
    /// construction: the trimmed result, exactly what a call with that prompt alone computes.
    empty_negative: Option<CachedPrompt>,
    /// Gemma-2 forward calls made by `encode_*` (not the two at construction); tests read it.
    encoder_calls: AtomicUsize,
}

/// One prompt's token ids and its `(1, 300, hidden)` embeddings and `(1, 300)` mask.
struct CachedPrompt {
    ids: Vec<u32>,
    embeds: Tensor,
    mask: Tensor,
}

impl TextEncoder {
    /// `tokenizer` is used as diffusers configures it: its own padding/truncation settings are replaced
    /// by the per-call ones, so they are cleared here.
    pub fn new(
        mut tokenizer: Tokenizer,
        encoder: Gemma2Encoder,
        pad_id: u32,
    ) -> Result<Self, PipelineError> {
        tokenizer
            .with_truncation(None)
            .map_err(|e| PipelineError::Load(format!("tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        let n_special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        let chi = complex_human_instruction();
        let chi_ids = tokenizer
            .encode(chi.as_str(), true)
            .map_err(|e| PipelineError::Load(format!("tokenizer: encoding the instruction: {e}")))?
            .get_ids()
            .to_vec();
        let n_chi = chi_ids.len();
        let prefix = match chi_ids.len().checked_sub(1) {
            Some(p) if p > 0 => Some(encoder.prefill(&chi_ids[..p]).map_err(|e| {
                PipelineError::Load(format!("gemma2: the instruction prefix: {e}"))
            })?),
            _ => None,
        };
        let mut te = Self {
            tokenizer,
            encoder,
            pad_id,
            chi,
            n_chi,
            n_special,
            prefix,
            empty_negative: None,
            encoder_calls: AtomicUsize::new(0),
        };
        let empty = te.tokenize(&[String::new()], false)?;
        let (embeds, mask) = te
            .encode_tokens(&empty, false, None, true)
            .map_err(|e| PipelineError::Load(format!("gemma2: the empty negative prompt: {e}")))?;
        te.empty_negative = Some(CachedPrompt {
            ids: empty.ids[0].clone(),
            embeds,
            mask,
        });
        te.encoder_calls.store(0, Ordering::Relaxed);
        Ok(te)
    }

    /// Gemma-2 forward calls made by [`Self::encode_prompts`] / [`Self::encode_with`] so far.
    pub fn encoder_calls(&self) -> usize {
        self.encoder_calls.load(Ordering::Relaxed)
    }

    /// The cached instruction prefix, if any (see the module docs).
    pub fn prefix(&self) -> Option<&PrefixCache> {
        self.prefix.as_ref()
    }

    /// Loads `tokenizer.json` from a diffusers `tokenizer/` folder. The pad id is the id of
    /// `tokenizer_config.json`'s `pad_token` (default `<pad>`).
    pub fn from_dir(tokenizer_dir: &Path, encoder: Gemma2Encoder) -> Result<Self, PipelineError> {
        let tok_path = tokenizer_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| PipelineError::Load(format!("{}: {e}", tok_path.display())))?;
        let cfg_path = tokenizer_dir.join("tokenizer_config.json");
        let pad_token = if cfg_path.exists() {
            let raw = std::fs::read_to_string(&cfg_path)
                .map_err(|e| PipelineError::Load(format!("{}: {e}", cfg_path.display())))?;
            let v: serde_json::Value = serde_json::from_str(&raw)
                .map_err(|e| PipelineError::Load(format!("{}: {e}", cfg_path.display())))?;
            token_content(&v["pad_token"]).unwrap_or_else(|| "<pad>".to_string())
        } else {
            "<pad>".to_string()
        };
        let pad_id = tokenizer.token_to_id(&pad_token).ok_or_else(|| {
            PipelineError::Load(format!("tokenizer has no pad token {pad_token:?}"))
        })?;
        Self::new(tokenizer, encoder, pad_id)
    }

    pub fn encoder(&self) -> &Gemma2Encoder {
        &self.encoder
    }

    /// Number of tokens of the instruction prefix, BOS included.
    pub fn n_chi(&self) -> usize {
        self.n_chi
    }

    /// Padded token length fed to Gemma: `n_chi + 298` with the instruction, 300 without.
    pub fn max_length(&self, use_chi: bool) -> usize {
        if use_chi {
            self.n_chi + MAX_SEQUENCE_LENGTH - 2
        } else {
            MAX_SEQUENCE_LENGTH
        }
    }

    /// Preprocesses and tokenizes like diffusers: ids/mask of `max_length(use_chi)` tokens per prompt.
    pub fn tokenize(&self, prompts: &[String], use_chi: bool) -> Result<Tokenized, PipelineError> {
        let max_len = self.max_length(use_chi);
        let mut out = Tokenized {
            ids: Vec::with_capacity(prompts.len()),
            mask: Vec::with_capacity(prompts.len()),
        };
        for prompt in prompts {
            let clean = python_lower_strip(prompt);
            let text = if use_chi {
                format!("{}{clean}", self.chi)
            } else {
                clean
            };
            let enc = self.encode_truncated(&text, max_len)?;
            let mut ids = enc.get_ids().to_vec();
            let mut mask = vec![1u32; ids.len()];
            ids.resize(max_len, self.pad_id);
            mask.resize(max_len, 0);
            out.ids.push(ids);
            out.mask.push(mask);
        }
        Ok(out)
    }

    /// `tokenizer(text, truncation=True, max_length)` without padding: truncate the raw tokens so
    /// that the post-processor's special tokens still fit, then post-process.
    fn encode_truncated(&self, text: &str, max_len: usize) -> Result<Encoding, PipelineError> {
        let tok_err =
            |e: tokenizers::Error| PipelineError::InvalidRequest(format!("tokenizer: {e}"));
        let mut enc = self.tokenizer.encode(text, false).map_err(tok_err)?;
        let budget = max_len.checked_sub(self.n_special).ok_or_else(|| {
            PipelineError::InvalidRequest(format!(
                "max_length {max_len} below {} special tokens",
                self.n_special
            ))
        })?;
        enc.truncate(budget, 0, TruncationDirection::Right);
        let enc = self
            .tokenizer
            .post_process(enc, None, true)
            .map_err(tok_err)?;
        if enc.len() > max_len {
            return Err(PipelineError::InvalidRequest(format!(
                "tokenizer produced {} tokens for max_length {max_len}",
                enc.len()
            )));
        }
        Ok(enc)
    }

    /// Prompt embeddings `(B, 300, hidden)` in the encoder dtype and mask `(B, 300)` u32, on the
    /// encoder's device. `use_chi = true` for prompts, `false` for negative prompts. Prompts whose tokens
    /// start with the cached instruction prefix run only the positions after it, and only up to their
    /// last real token (rounded up to [`TRIM_BUCKET`]); the padding rows after that are zero (module docs).
    pub fn encode_prompts(
        &self,
        prompts: &[String],
        use_chi: bool,
    ) -> Result<(Tensor, Tensor), PipelineError> {
        let prefix = if use_chi { self.prefix.as_ref() } else { None };
        self.encode_with(prompts, use_chi, prefix, true)
    }

    /// [`Self::encode_prompts`] with the given prefix cache (none: every position from the first) and
    /// `trim` (false: every padding position too, diffusers' whole computation).
    pub fn encode_with(
        &self,
        prompts: &[String],
        use_chi: bool,
        prefix: Option<&PrefixCache>,
        trim: bool,
    ) -> Result<(Tensor, Tensor), PipelineError> {
        let tok = self.tokenize(prompts, use_chi)?;
        // Negative prompts whose tokens are the empty prompt's take the cached rows (trimmed computation
        // only: that is what the cache holds); the others run.
        let cached = self
            .empty_negative
            .as_ref()
            .filter(|_| trim && !use_chi && prefix.is_none());
        let Some(cached) = cached.filter(|c| tok.ids.contains(&c.ids)) else {
            return self.encode_tokens(&tok, use_chi, prefix, trim);
        };
        let n = prompts.len();
        let miss: Vec<usize> = (0..n).filter(|&i| tok.ids[i] != cached.ids).collect();
        if miss.is_empty() {
            return Ok((
                cached.embeds.repeat((n, 1, 1))?,
                cached.mask.repeat((n, 1))?,
            ));
        }
        let pick = |rows: &[Vec<u32>]| -> Vec<Vec<u32>> {
            miss.iter().map(|&i| rows[i].clone()).collect()
        };
        let run = Tokenized {
            ids: pick(&tok.ids),
            mask: pick(&tok.mask),
        };
        let (embeds, mask) = self.encode_tokens(&run, use_chi, prefix, trim)?;
        // Rows 0..miss.len() are the prompts that ran, row miss.len() the cached one.
        let mut at = vec![miss.len() as u32; n];
        for (row, &i) in miss.iter().enumerate() {
            at[i] = row as u32;
        }
        let at = Tensor::from_vec(at, n, self.encoder.device())?;
        Ok((
            Tensor::cat(&[&embeds, &cached.embeds], 0)?.index_select(&at, 0)?,
            Tensor::cat(&[&mask, &cached.mask], 0)?.index_select(&at, 0)?,
        ))
    }

    /// [`Self::encode_with`] without the empty-negative-prompt cache: every prompt through Gemma-2.
    pub fn encode_computed(
        &self,
        prompts: &[String],
        use_chi: bool,
        prefix: Option<&PrefixCache>,
        trim: bool,
    ) -> Result<(Tensor, Tensor), PipelineError> {
        let tok = self.tokenize(prompts, use_chi)?;
        self.encode_tokens(&tok, use_chi, prefix, trim)
    }

    /// [`Self::encode_with`] on tokenized prompts, every one through Gemma-2.
    fn encode_tokens(
        &self,
        tok: &Tokenized,
        use_chi: bool,
        prefix: Option<&PrefixCache>,
        trim: bool,
    ) -> Result<(Tensor, Tensor), PipelineError> {
        if tok.ids.is_empty() {
            return Err(PipelineError::InvalidRequest("no prompts to encode".into()));
        }
        let l = self.max_length(use_chi);
        let prefix = prefix.filter(|p| p.len() <= l - (MAX_SEQUENCE_LENGTH - 1));
        let hits: Vec<bool> = tok
            .ids
            .iter()
            .map(|ids| prefix.is_some_and(|p| ids.starts_with(p.ids())))
            .collect();
        let embeds = self.embed_rows(tok, l, prefix, &hits, trim)?;
        let first = l - (MAX_SEQUENCE_LENGTH - 1);
        let dev = self.encoder.device();
        let mask: Vec<u32> = tok
            .mask
            .iter()
            .flat_map(|m| std::iter::once(m[0]).chain(m[first..].iter().copied()))
            .collect();
        let mask = Tensor::from_vec(mask, (tok.mask.len(), MAX_SEQUENCE_LENGTH), dev)?;
        debug_assert_eq!(mask.dtype(), DType::U32);
        Ok((embeds, mask))
    }

    /// The kept rows (`[0] + [L−299, L)`) of Gemma-2 on the tokenized prompts `tok` (`L` tokens each):
    /// prompt `i` with `hits[i]` runs after `prefix` (its tokens must start with the prefix's), the others
    /// from position 0; with `trim`, each runs only up to its last real token rounded up to
    /// [`TRIM_BUCKET`] positions, and its kept rows after that are zero. With batch invariance on
    /// (`ops::set_batch_invariant`, the default) each prompt goes through Gemma-2 in a call of its own, as
    /// alone; off, prompts with the same start and run length share one call. Returns `(B, 300, hidden)` in
    /// the prompts' order.
    fn embed_rows(
        &self,
        tok: &Tokenized,
        l: usize,
        prefix: Option<&PrefixCache>,
        hits: &[bool],
        trim: bool,
    ) -> Result<Tensor, PipelineError> {
        let first = l - (MAX_SEQUENCE_LENGTH - 1);
        let dev = self.encoder.device();
        let msg = |m: &str| PipelineError::Candle(candle_core::Error::Msg(format!("text: {m}")));
        let start = |i: usize| -> Result<usize, PipelineError> {
            if !hits[i] {
                return Ok(0);
            }
            let p = prefix.ok_or_else(|| msg("prompts marked for a missing prefix"))?;
            if p.len() > first || !tok.ids[i].starts_with(p.ids()) {
                return Err(msg("a prompt does not start with the cached prefix"));
            }
            Ok(p.len())
        };
        // (start, positions run) → prompts, in the order first seen. With batch invariance on, every prompt
        // runs in a call of its own: Gemma-2's linears take the fastest algorithm for the call's rows
        // (`ops::linear_fastest`), so a prompt computes exactly what it computes alone only at its solo shape.
        let alone = crate::ops::batch_invariant();
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for i in 0..tok.ids.len() {
            let from = start(i)?;
            let run = if trim {
                let end = tok.mask[i]
                    .iter()
                    .rposition(|&m| m != 0)
                    .map_or(0, |j| j + 1)
                    .max(from + 1);
                (end - from).next_multiple_of(TRIM_BUCKET).min(l - from)
            } else {
                l - from
            };
            match groups
                .iter_mut()
                .find(|(key, _)| !alone && *key == (from, run))
            {
                Some((_, idx)) => idx.push(i),
                None => groups.push(((from, run), vec![i])),
            }
        }
        let mut parts = Vec::with_capacity(groups.len());
        for ((from, run), idx) in &groups {
            let (from, run, n) = (*from, *run, idx.len());
            let take = |rows: &[Vec<u32>]| -> Vec<u32> {
                idx.iter()
                    .flat_map(|&i| rows[i][from..from + run].iter().copied())
                    .collect()
            };
            let ids = Tensor::from_vec(take(&tok.ids), (n, run), dev)?;
            let mask = Tensor::from_vec(take(&tok.mask), (n, run), dev)?;
            self.encoder_calls.fetch_add(1, Ordering::Relaxed);
            let (hidden, bos) = match prefix.filter(|_| from > 0) {
                Some(p) => {
                    let after = self.encoder.forward_after(p, &ids, &mask)?; // positions P..P + run
                    let bos = p.hidden().narrow(1, 0, 1)?;
                    let bos = bos.broadcast_as((n, 1, bos.dim(2)?))?.contiguous()?;
                    (after, bos)
                }
                None => {
                    let hidden = self.encoder.forward(&ids, &mask)?; // positions 0..run
                    let bos = hidden.narrow(1, 0, 1)?.contiguous()?;
                    (hidden, bos)
                }
            };
            // Kept rows [first, L): [first, from + run) were computed, the rest is padding left out.
            let computed = (from + run).saturating_sub(first);
            let mut rows = vec![bos];
            if computed > 0 {
                rows.push(hidden.narrow(1, first - from, computed)?.contiguous()?);
            }
            if computed < MAX_SEQUENCE_LENGTH - 1 {
                let hd = hidden.dim(2)?;
                let zeros = (n, MAX_SEQUENCE_LENGTH - 1 - computed, hd);
                rows.push(Tensor::zeros(zeros, hidden.dtype(), dev)?);
            }
            parts.push(Tensor::cat(&rows, 1)?);
        }
        Ok(match parts.as_slice() {
            [one] => one.clone(),
            _ => {
                // Back to the prompts' order: row r of the groups' rows in turn is prompt `order[r]`.
                let order: Vec<usize> = groups
                    .iter()
                    .flat_map(|(_, idx)| idx.iter().copied())
                    .collect();
                let mut at = vec![0u32; order.len()];
                for (row, &prompt) in order.iter().enumerate() {
                    at[prompt] = row as u32;
                }
                let at = Tensor::from_vec(at, order.len(), dev)?;
                Tensor::cat(&parts, 0)?.index_select(&at, 0)?
            }
        })
    }
}

/// A special token in `tokenizer_config.json` is either a string or an `AddedToken` object.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemma2::tests::{rel_l2, text_reference, tiny_fixture_encoder, FIXTURES};
    use crate::gemma2::AttnImplementation;
    use candle_core::Result;

    fn tiny_text_encoder(attn: AttnImplementation) -> Result<TextEncoder> {
        let dir = std::path::PathBuf::from(format!("{FIXTURES}/tiny/sana/tokenizer"));
        TextEncoder::from_dir(&dir, tiny_fixture_encoder(attn)?).map_err(candle_core::Error::wrap)
    }

    fn reference_strings(key: &str) -> Vec<String> {
        let raw = std::fs::read_to_string(format!("{FIXTURES}/reference/text.json"))
            .expect("reference/text.json is committed");
        let v: serde_json::Value = serde_json::from_str(&raw).expect("valid json");
        serde_json::from_value(v[key].clone()).expect("list of strings")
    }

    fn rows(t: &Tensor) -> Result<Vec<Vec<u32>>> {
        t.to_dtype(DType::U32)?.to_vec2::<u32>()
    }

    #[test]
    fn python_strip_and_lower() {
        assert_eq!(
            python_lower_strip("  A Small CAT\tsleeping!\n "),
            "a small cat\tsleeping!"
        );
        // U+001C..U+001F are whitespace for Python's strip() but not for Rust's trim().
        assert_eq!(python_lower_strip("\u{1c}\u{1f}Fox\u{1d}\u{1e}"), "fox");
        assert_eq!("\u{1c}fox".trim(), "\u{1c}fox");
        // Both sides strip NBSP, ideographic space, line/paragraph separators, NEL.
        assert_eq!(
            python_lower_strip("\u{a0}\u{3000}\u{2028}\u{85}x\u{2029}\u{202f}"),
            "x"
        );
        // Not whitespace for Python: zero-width space, Mongolian vowel separator.
        assert_eq!(python_lower_strip("\u{200b}x\u{180e}"), "\u{200b}x\u{180e}");
        // Full Unicode lowercase like CPython: 'İ'.lower() == 'i̇', final sigma, 'ẞ' -> 'ß'.
        assert_eq!(python_lower_strip("İ"), "i\u{307}");
        assert_eq!(python_lower_strip("ΟΔΟΣ"), "οδος");
        assert_eq!(python_lower_strip("ẞ"), "ß");
        assert_eq!(python_lower_strip(" \t\n"), "");
    }

    #[test]
    fn instruction_text_matches_diffusers() {
        let chi = complex_human_instruction();
        assert_eq!(chi.chars().count(), 1057); // spec §1.5
        let raw = std::fs::read_to_string(format!("{FIXTURES}/reference/text.json"))
            .expect("reference/text.json is committed");
        let v: serde_json::Value = serde_json::from_str(&raw).expect("valid json");
        assert_eq!(v["chi_joined"].as_str(), Some(chi.as_str()));
        assert_eq!(
            reference_strings("complex_human_instruction"),
            COMPLEX_HUMAN_INSTRUCTION
        );
    }

    #[test]
    fn preprocessing_matches_reference() {
        let got: Vec<String> = reference_strings("prompts")
            .iter()
            .map(|p| python_lower_strip(p))
            .collect();
        assert_eq!(got, reference_strings("prompts_preprocessed"));
    }

    #[test]
    fn token_ids_and_masks_equal_reference() -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        let reference = text_reference()?;
        assert_eq!(te.n_chi(), 161); // reference/text.json "n_chi"
        assert_eq!(te.max_length(true), 459);
        let pos = te
            .tokenize(&reference_strings("prompts"), true)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(pos.ids, rows(&reference["prompt_ids"])?);
        assert_eq!(pos.mask, rows(&reference["prompt_mask"])?);
        let neg = te
            .tokenize(&reference_strings("negative_prompts"), false)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(neg.ids, rows(&reference["neg_ids"])?);
        assert_eq!(neg.mask, rows(&reference["neg_mask"])?);
        Ok(())
    }

    /// `emb` rows where `mask` is 1 (the rows the transformer attends to), zero elsewhere.
    fn live_rows(emb: &Tensor, mask: &Tensor) -> Result<Tensor> {
        emb.broadcast_mul(&mask.to_dtype(emb.dtype())?.unsqueeze(2)?)
    }

    /// What `encode_prompts` serves (prefix cache, trimmed padding) and diffusers' whole computation
    /// (`encode_with(.., None, false)`) against the diffusers reference: the live rows of the first, every
    /// row of the second.
    fn check_against_reference(
        use_chi: bool,
        key: &str,
        embeds: &str,
        mask_key: &str,
    ) -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        let reference = text_reference()?;
        let prompts = reference_strings(key);
        let (emb, mask) = te
            .encode_prompts(&prompts, use_chi)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(emb.dims(), &[prompts.len(), 300, 64]);
        assert_eq!(rows(&mask)?, rows(&reference[mask_key])?);
        let want = &reference[embeds];
        let err = rel_l2(&live_rows(&emb, &mask)?, &live_rows(want, &mask)?)?;
        assert!(err <= 1e-4, "{key}: live rows relative L2 {err}"); // tolerance: rel L2 ≤ 1e-4 (f32)
        let (whole, _) = te
            .encode_with(&prompts, use_chi, None, false)
            .map_err(candle_core::Error::wrap)?;
        let err = rel_l2(&whole, want)?;
        assert!(err <= 1e-4, "{key}: every row relative L2 {err}"); // tolerance: rel L2 ≤ 1e-4 (f32)
        Ok(())
    }

    #[test]
    fn prompt_embeddings_match_reference() -> Result<()> {
        check_against_reference(true, "prompts", "prompt_embeds", "prompt_embeds_mask")
    }

    #[test]
    fn negative_embeddings_match_reference() -> Result<()> {
        check_against_reference(false, "negative_prompts", "neg_embeds", "neg_mask")
    }

    #[test]
    fn trimmed_padding_rows_are_zero_and_the_rest_is_unchanged() -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        for (use_chi, key) in [(true, "prompts"), (false, "negative_prompts")] {
            let prompts = reference_strings(key);
            let tok = te
                .tokenize(&prompts, use_chi)
                .map_err(candle_core::Error::wrap)?;
            let (trimmed, mask) = te
                .encode_with(&prompts, use_chi, None, true)
                .map_err(candle_core::Error::wrap)?;
            let (whole, mask_w) = te
                .encode_with(&prompts, use_chi, None, false)
                .map_err(candle_core::Error::wrap)?;
            assert_eq!(rows(&mask)?, rows(&mask_w)?);
            let l = te.max_length(use_chi);
            let first = l - (MAX_SEQUENCE_LENGTH - 1);
            let mut zero_rows = 0;
            for (i, m) in tok.mask.iter().enumerate() {
                let end = m.iter().rposition(|&x| x != 0).unwrap() + 1;
                let run = end.next_multiple_of(TRIM_BUCKET).min(l); // from position 0
                                                                    // Kept row r ≥ 1 is position first + r − 1: computed up to `run`.
                let kept = 1 + run.saturating_sub(first);
                let (t, w) = (trimmed.get(i)?, whole.get(i)?);
                let err = rel_l2(&t.narrow(0, 0, kept)?, &w.narrow(0, 0, kept)?)?;
                // tolerance: f32, only the GEMM row count differs
                assert!(err <= 1e-5, "{key} {i}: computed rows relative L2 {err}");
                if kept < 300 {
                    let rest = t.narrow(0, kept, 300 - kept)?;
                    assert_eq!(rest.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{key} {i}");
                }
                // Every zero row is padding: the transformer masks it out.
                let mrow = rows(&mask)?[i].clone();
                assert!(mrow[kept..].iter().all(|&x| x == 0), "{key} {i}");
                zero_rows += 300 - kept;
            }
            assert!(zero_rows > 0, "{key}: nothing was trimmed");
        }
        Ok(())
    }

    #[test]
    fn sdpa_variant_without_softcap_matches_reference() -> Result<()> {
        let reference = text_reference()?;
        let prompt = reference_strings("prompts")[..1].to_vec();
        let want = &reference["prompt0_embeds_sdpa"]; // transformers 5.17-style sdpa: softcap dropped
        let sdpa = tiny_text_encoder(AttnImplementation::Sdpa)?;
        let (emb, _) = sdpa
            .encode_with(&prompt, true, sdpa.prefix(), false)
            .map_err(candle_core::Error::wrap)?;
        let err = rel_l2(&emb, want)?;
        assert!(err <= 1e-4, "sdpa embeds relative L2 {err}"); // tolerance: rel L2 ≤ 1e-4 (f32)
                                                               // The variants must be distinguishable, otherwise this test proves nothing.
        let eager = tiny_text_encoder(AttnImplementation::Eager)?;
        let (emb_eager, _) = eager
            .encode_with(&prompt, true, eager.prefix(), false)
            .map_err(candle_core::Error::wrap)?;
        let gap = rel_l2(&emb_eager, want)?;
        assert!(
            gap > 10.0 * err.max(1e-7),
            "eager vs sdpa reference gap {gap} too small"
        );
        Ok(())
    }

    #[test]
    fn instruction_prefix_cache_matches_the_whole_sequence() -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        let prefix = te.prefix().expect("the instruction is cached");
        assert_eq!(prefix.len(), te.n_chi() - 1);
        let prompts = reference_strings("prompts");
        let tok = te
            .tokenize(&prompts, true)
            .map_err(candle_core::Error::wrap)?;
        assert!(
            tok.ids.iter().all(|ids| ids.starts_with(prefix.ids())),
            "every reference prompt starts with the cached tokens"
        );
        let (cached, mask_c) = te
            .encode_with(&prompts, true, Some(prefix), false)
            .map_err(candle_core::Error::wrap)?;
        let (whole, mask_w) = te
            .encode_with(&prompts, true, None, false)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(rows(&mask_c)?, rows(&mask_w)?);
        let err = rel_l2(&cached, &whole)?;
        // tolerance: f32, only the summation order of fewer rows differs
        assert!(err <= 1e-5, "cached vs whole relative L2 {err}");
        // Prompts 0 and 2 after the prefix, prompt 1 whole: each row back in the prompts' order.
        let l = te.max_length(true);
        let mixed = te
            .embed_rows(&tok, l, Some(prefix), &[true, false, true], false)
            .map_err(candle_core::Error::wrap)?;
        for i in 0..3 {
            let err = rel_l2(&mixed.get(i)?, &whole.get(i)?)?;
            assert!(err <= 1e-5, "mixed row {i}: relative L2 {err}");
        }
        // What is served (cached and trimmed), also with prompt 1 in a group of its own: the rows the
        // transformer reads are those of the whole computation.
        let (served, _) = te
            .encode_prompts(&prompts, true)
            .map_err(candle_core::Error::wrap)?;
        let mixed = te
            .embed_rows(&tok, l, Some(prefix), &[true, false, true], true)
            .map_err(candle_core::Error::wrap)?;
        let live_whole = live_rows(&whole, &mask_w)?;
        for (name, t) in [("served", &served), ("mixed trimmed", &mixed)] {
            let err = rel_l2(&live_rows(t, &mask_w)?, &live_whole)?;
            assert!(err <= 1e-5, "{name}: live rows relative L2 {err}");
        }
        assert!(
            rel_l2(&whole.get(0)?, &whole.get(1)?)? > 1e-2,
            "rows must differ"
        );
        // A cache no prompt starts with: every prompt runs whole, as without a cache.
        let other = te.encoder().prefill(&[prefix.ids()[0]; 4])?;
        let (none_hit, _) = te
            .encode_with(&prompts, true, Some(&other), false)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(
            none_hit.flatten_all()?.to_vec1::<f32>()?,
            whole.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn empty_negative_prompt_comes_from_the_cache_with_the_computed_bits() -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        let computed = |p: &[&str]| -> Result<(Tensor, Tensor)> {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            te.encode_computed(&p, false, None, true)
                .map_err(candle_core::Error::wrap)
        };
        let neg = |p: &[&str]| -> Result<(Tensor, Tensor)> {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            te.encode_prompts(&p, false)
                .map_err(candle_core::Error::wrap)
        };
        let calls = te.encoder_calls();
        // "" and whitespace (stripped to "") run no Gemma-2 call and equal the computation bit for bit.
        let (e, m) = neg(&["", "  "])?;
        assert_eq!(te.encoder_calls(), calls, "the empty prompt ran Gemma-2");
        let (want_e, want_m) = computed(&["", ""])?;
        assert_eq!(bits(&e)?, bits(&want_e)?);
        assert_eq!(rows(&m)?, rows(&want_m)?);
        // Mixed: only the real prompt runs, and every row lands in its prompt's place.
        let calls = te.encoder_calls();
        let (e, m) = neg(&["", "blurry, low quality", ""])?;
        assert_eq!(te.encoder_calls(), calls + 1);
        let (want_e, want_m) = computed(&["", "blurry, low quality", ""])?;
        assert_eq!(bits(&e)?, bits(&want_e)?);
        assert_eq!(rows(&m)?, rows(&want_m)?);
        assert!(
            rel_l2(&e.get(0)?, &e.get(1)?)? > 1e-2,
            "the real prompt's rows must differ from the empty one's"
        );
        // Positive prompts and diffusers' untrimmed computation never read the cache.
        let c = te.encoder_calls();
        te.encode_prompts(&[String::new()], true)
            .map_err(candle_core::Error::wrap)?;
        te.encode_with(&[String::new()], false, None, false)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(te.encoder_calls(), c + 2);
        Ok(())
    }

    #[test]
    fn text_encoder_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TextEncoder>();
    }
}
