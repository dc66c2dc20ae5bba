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
//! [`TextEncoder`] is immutable after construction (`Send + Sync`), so one instance can be shared by
//! both pipelines behind an `Arc`.

use std::path::Path;

use candle_core::{DType, Tensor};
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

use super::gemma2::Gemma2Encoder;
use super::PipelineError;

/// Caption length seen by the transformer (`max_sequence_length` in diffusers).
pub const MAX_SEQUENCE_LENGTH: usize = 300;

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
        let n_chi = tokenizer
            .encode(chi.as_str(), true)
            .map_err(|e| PipelineError::Load(format!("tokenizer: encoding the instruction: {e}")))?
            .len();
        Ok(Self {
            tokenizer,
            encoder,
            pad_id,
            chi,
            n_chi,
            n_special,
        })
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
    /// encoder's device. `use_chi = true` for prompts, `false` for negative prompts.
    pub fn encode_prompts(
        &self,
        prompts: &[String],
        use_chi: bool,
    ) -> Result<(Tensor, Tensor), PipelineError> {
        if prompts.is_empty() {
            return Err(PipelineError::InvalidRequest("no prompts to encode".into()));
        }
        let tok = self.tokenize(prompts, use_chi)?;
        let (b, l) = (tok.ids.len(), self.max_length(use_chi));
        let dev = self.encoder.device();
        let ids = Tensor::from_vec(tok.ids.concat(), (b, l), dev)?;
        let mask = Tensor::from_vec(tok.mask.concat(), (b, l), dev)?;
        let hidden = self.encoder.forward(&ids, &mask)?; // (B, L, hidden)
        let select: Vec<u32> = std::iter::once(0)
            .chain((l - (MAX_SEQUENCE_LENGTH - 1))..l)
            .map(|i| i as u32)
            .collect();
        let select = Tensor::from_vec(select, MAX_SEQUENCE_LENGTH, dev)?;
        let embeds = hidden.index_select(&select, 1)?;
        let mask = mask.index_select(&select, 1)?;
        debug_assert_eq!(mask.dtype(), DType::U32);
        Ok((embeds, mask))
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

    #[test]
    fn prompt_embeddings_match_reference() -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        let reference = text_reference()?;
        let (emb, mask) = te
            .encode_prompts(&reference_strings("prompts"), true)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(emb.dims(), &[3, 300, 64]);
        assert_eq!(rows(&mask)?, rows(&reference["prompt_embeds_mask"])?);
        let err = rel_l2(&emb, &reference["prompt_embeds"])?;
        assert!(err <= 1e-4, "prompt embeds relative L2 {err}"); // tolerance: rel L2 ≤ 1e-4 (f32)
        Ok(())
    }

    #[test]
    fn negative_embeddings_match_reference() -> Result<()> {
        let te = tiny_text_encoder(AttnImplementation::Eager)?;
        let reference = text_reference()?;
        let (emb, mask) = te
            .encode_prompts(&reference_strings("negative_prompts"), false)
            .map_err(candle_core::Error::wrap)?;
        assert_eq!(rows(&mask)?, rows(&reference["neg_mask"])?);
        let err = rel_l2(&emb, &reference["neg_embeds"])?;
        assert!(err <= 1e-4, "negative embeds relative L2 {err}"); // tolerance: rel L2 ≤ 1e-4 (f32)
        Ok(())
    }

    #[test]
    fn sdpa_variant_without_softcap_matches_reference() -> Result<()> {
        let reference = text_reference()?;
        let prompt = reference_strings("prompts")[..1].to_vec();
        let want = &reference["prompt0_embeds_sdpa"]; // transformers 5.17-style sdpa: softcap dropped
        let sdpa = tiny_text_encoder(AttnImplementation::Sdpa)?;
        let (emb, _) = sdpa
            .encode_prompts(&prompt, true)
            .map_err(candle_core::Error::wrap)?;
        let err = rel_l2(&emb, want)?;
        assert!(err <= 1e-4, "sdpa embeds relative L2 {err}"); // tolerance: rel L2 ≤ 1e-4 (f32)
                                                               // The variants must be distinguishable, otherwise this test proves nothing.
        let eager = tiny_text_encoder(AttnImplementation::Eager)?;
        let (emb_eager, _) = eager
            .encode_prompts(&prompt, true)
            .map_err(candle_core::Error::wrap)?;
        let gap = rel_l2(&emb_eager, want)?;
        assert!(
            gap > 10.0 * err.max(1e-7),
            "eager vs sdpa reference gap {gap} too small"
        );
        Ok(())
    }

    #[test]
    fn text_encoder_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TextEncoder>();
    }
}
