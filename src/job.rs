//! Job input schema, validation and billing (service-contract §2, §3, §6).
//!
//! One schema serves both endpoint kinds; only the step default and range differ. Validation mirrors
//! what pydantic does for the fal app: unknown fields are ignored, every violation is reported with its
//! location, and the error body has FastAPI's `detail[]` shape. The dispatcher validates before
//! enqueueing; the worker validates the same way again before running anything.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Which pipeline a job runs on. The routing key of `fleet.jobs` and the `x-endpoint` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// Sana 1600M, flow DPM-Solver++ with CFG, 18 steps by default.
    Base,
    /// Sana-Sprint 1.6B, TrigFlow SCM, 2 steps by default.
    Sprint,
}

impl EndpointKind {
    pub const ALL: [EndpointKind; 2] = [EndpointKind::Base, EndpointKind::Sprint];

    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Base => "base",
            EndpointKind::Sprint => "sprint",
        }
    }

    pub fn default_steps(self) -> u32 {
        match self {
            EndpointKind::Base => 18,
            EndpointKind::Sprint => 2,
        }
    }

    pub fn max_steps(self) -> u32 {
        match self {
            EndpointKind::Base => 50,
            EndpointKind::Sprint => 20,
        }
    }
}

impl std::str::FromStr for EndpointKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "base" => Ok(EndpointKind::Base),
            "sprint" => Ok(EndpointKind::Sprint),
            other => Err(format!(
                "unknown endpoint kind {other:?} (expected base or sprint)"
            )),
        }
    }
}

impl std::fmt::Display for EndpointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jpeg,
    Png,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Png => "png",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
        }
    }
}

/// Requested output size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// fal's size presets (service-contract §2).
pub const SIZE_PRESETS: [(&str, ImageSize); 6] = [
    (
        "square_hd",
        ImageSize {
            width: 1024,
            height: 1024,
        },
    ),
    (
        "square",
        ImageSize {
            width: 512,
            height: 512,
        },
    ),
    (
        "portrait_4_3",
        ImageSize {
            width: 768,
            height: 1024,
        },
    ),
    (
        "portrait_16_9",
        ImageSize {
            width: 576,
            height: 1024,
        },
    ),
    (
        "landscape_4_3",
        ImageSize {
            width: 1024,
            height: 768,
        },
    ),
    (
        "landscape_16_9",
        ImageSize {
            width: 1024,
            height: 576,
        },
    ),
];

pub const DEFAULT_SIZE: ImageSize = ImageSize {
    width: 3840,
    height: 2160,
};
pub const MAX_SIDE: u32 = 14142;
pub const MAX_PROMPT_CHARS: usize = 10_000;
pub const MAX_SEED: u64 = (1u64 << 63) - 1;

/// A fully validated input with every default filled in (the seed included). This is what travels in
/// the job message and what the worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInput {
    pub prompt: String,
    pub negative_prompt: String,
    pub image_size: ImageSize,
    pub num_inference_steps: u32,
    pub seed: u64,
    pub guidance_scale: f64,
    pub enable_safety_checker: bool,
    pub num_images: u32,
    pub output_format: OutputFormat,
}

impl JobInput {
    /// Billing units of a successful run of this input.
    pub fn billable_units(&self) -> u64 {
        billable_units(
            self.image_size.width,
            self.image_size.height,
            self.num_images,
        )
    }
}

/// `ceil(w·h / 1024²) · num_images` of the requested size (fal's `x-fal-billable-units`).
pub fn billable_units(width: u32, height: u32, num_images: u32) -> u64 {
    let pixels = u64::from(width) * u64::from(height);
    pixels.div_ceil(1024 * 1024) * u64::from(num_images)
}

/// One entry of FastAPI's `detail[]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldError {
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub input: Value,
}

impl FieldError {
    fn new(field: &[&str], kind: &str, msg: impl Into<String>, input: Value) -> Self {
        let mut loc = vec!["body".to_string()];
        loc.extend(field.iter().map(|s| s.to_string()));
        FieldError {
            loc,
            msg: msg.into(),
            kind: kind.to_string(),
            // Echo a bounded copy: a 1 MB prompt must not come back whole in the 422 body.
            input: bounded_echo(&input),
        }
    }

    /// The field path without the leading `body`, e.g. `image_size.width`.
    pub fn field(&self) -> String {
        self.loc
            .iter()
            .skip(1)
            .cloned()
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// All violations of one input, in field order.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} validation error(s): {}", .0.len(), .0.iter().map(|e| format!("{}: {}", e.field(), e.msg)).collect::<Vec<_>>().join("; "))]
pub struct ValidationError(pub Vec<FieldError>);

impl ValidationError {
    /// FastAPI's 422 body.
    pub fn to_body(&self) -> Value {
        json!({ "detail": self.0 })
    }
}

/// Validates a raw JSON input for `kind`. `fresh_seed` supplies the seed when none is given
/// (called at most once), so callers choose their randomness and tests can pin it.
pub fn validate(
    kind: EndpointKind,
    raw: &Value,
    fresh_seed: impl FnOnce() -> u64,
) -> Result<JobInput, ValidationError> {
    let Some(obj) = raw.as_object() else {
        return Err(ValidationError(vec![FieldError {
            loc: vec!["body".into()],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            kind: "model_attributes_type".into(),
            input: bounded_echo(raw),
        }]));
    };
    let mut errs = Vec::new();
    let prompt = text_field(obj, "prompt", true, &mut errs);
    let negative_prompt = text_field(obj, "negative_prompt", false, &mut errs);
    let image_size = size_field(obj, &mut errs);
    let steps = int_field(
        obj,
        "num_inference_steps",
        1,
        i64::from(kind.max_steps()),
        &mut errs,
    )
    .map_or(kind.default_steps(), |v| v as u32);
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match as_int(v) {
            Some(s) if s >= 0 => Some(s as u64),
            Some(_) => {
                errs.push(FieldError::new(
                    &["seed"],
                    "greater_than_equal",
                    "Input should be greater than or equal to 0",
                    v.clone(),
                ));
                None
            }
            None if v.as_u64().is_some() => {
                errs.push(FieldError::new(
                    &["seed"],
                    "less_than",
                    format!("Input should be less than {}", 1u64 << 63),
                    v.clone(),
                ));
                None
            }
            None => {
                errs.push(int_type_error("seed", v));
                None
            }
        },
    };
    let guidance_scale = match obj.get("guidance_scale") {
        None => 5.0,
        Some(v) => match v.as_f64() {
            Some(g) if (0.0..=20.0).contains(&g) => g,
            Some(_) => {
                errs.push(FieldError::new(
                    &["guidance_scale"],
                    "range",
                    "Input should be between 0.0 and 20.0",
                    v.clone(),
                ));
                5.0
            }
            None => {
                errs.push(FieldError::new(
                    &["guidance_scale"],
                    "float_type",
                    "Input should be a valid number",
                    v.clone(),
                ));
                5.0
            }
        },
    };
    let enable_safety_checker = match obj.get("enable_safety_checker") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            errs.push(FieldError::new(
                &["enable_safety_checker"],
                "bool_type",
                "Input should be a valid boolean",
                v.clone(),
            ));
            true
        }
    };
    let num_images = int_field(obj, "num_images", 1, 4, &mut errs).map_or(1, |v| v as u32);
    let output_format = match obj.get("output_format") {
        None => OutputFormat::Jpeg,
        Some(Value::String(s)) if s == "jpeg" => OutputFormat::Jpeg,
        Some(Value::String(s)) if s == "png" => OutputFormat::Png,
        Some(v) => {
            errs.push(FieldError::new(
                &["output_format"],
                "literal_error",
                "Input should be 'jpeg' or 'png'",
                v.clone(),
            ));
            OutputFormat::Jpeg
        }
    };
    if !errs.is_empty() {
        return Err(ValidationError(errs));
    }
    Ok(JobInput {
        prompt: prompt.unwrap_or_default(),
        negative_prompt: negative_prompt.unwrap_or_default(),
        image_size: image_size.unwrap_or(DEFAULT_SIZE),
        num_inference_steps: steps,
        seed: seed.unwrap_or_else(|| fresh_seed() & MAX_SEED),
        guidance_scale,
        enable_safety_checker,
        num_images,
        output_format,
    })
}

/// Longest request id accepted, in bytes. Ids become AMQP `message_id`s (short strings, at most 255
/// bytes), S3 key segments and URL path segments; a uuid is 36.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Checks a client-chosen request id: 1..=[`MAX_REQUEST_ID_LEN`] bytes of ASCII letters, digits, `-`,
/// `_` and `.`, starting with a letter or digit, so it is a safe S3 key segment (no `/`, no `..`), a
/// valid AMQP short string and a plain URL path segment. `loc` is where the id came from
/// (`["body","request_id"]`, `["path","request_id"]`).
pub fn validate_request_id(id: &str, loc: &[&str]) -> Result<(), ValidationError> {
    let err = |kind: &str, msg: String| {
        Err(ValidationError(vec![FieldError {
            loc: loc.iter().map(|s| s.to_string()).collect(),
            msg,
            kind: kind.to_string(),
            input: Value::String(bounded_prefix(id, MAX_REQUEST_ID_LEN)),
        }]))
    };
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN {
        return err(
            "string_length",
            format!("request_id should have 1 to {MAX_REQUEST_ID_LEN} characters"),
        );
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !id.chars().all(safe) || !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return err(
            "string_pattern_mismatch",
            "request_id should match ^[A-Za-z0-9][A-Za-z0-9._-]*$".to_string(),
        );
    }
    Ok(())
}

/// Longest prefix of a client's text echoed back in an error (a `422` body, a `failed` event).
pub const MAX_ECHO_CHARS: usize = 256;

/// The first `max` characters of `s`, with `…` appended when something was cut.
pub fn bounded_prefix(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// A copy of `v` small enough to echo back: strings cut to [`MAX_ECHO_CHARS`], arrays and objects to
/// their first 16 entries, nesting to depth 4.
pub fn bounded_echo(v: &Value) -> Value {
    fn go(v: &Value, depth: usize) -> Value {
        match v {
            Value::String(s) => Value::String(bounded_prefix(s, MAX_ECHO_CHARS)),
            Value::Array(_) | Value::Object(_) if depth >= 4 => Value::String("…".into()),
            Value::Array(a) => Value::Array(a.iter().take(16).map(|x| go(x, depth + 1)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .take(16)
                    .map(|(k, x)| (bounded_prefix(k, MAX_ECHO_CHARS), go(x, depth + 1)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    go(v, 0)
}

/// Re-validates an already validated input (the worker's second check): the same rules, no defaults
/// left to fill.
pub fn revalidate(kind: EndpointKind, input: &JobInput) -> Result<JobInput, ValidationError> {
    let raw = serde_json::to_value(input).map_err(|e| {
        ValidationError(vec![FieldError::new(
            &[],
            "value_error",
            e.to_string(),
            Value::Null,
        )])
    })?;
    validate(kind, &raw, || input.seed)
}

fn text_field(
    obj: &Map<String, Value>,
    name: &str,
    required: bool,
    errs: &mut Vec<FieldError>,
) -> Option<String> {
    match obj.get(name) {
        None if required => {
            errs.push(FieldError::new(
                &[name],
                "missing",
                "Field required",
                Value::Null,
            ));
            None
        }
        None => None,
        Some(Value::String(s)) => {
            if s.chars().count() > MAX_PROMPT_CHARS {
                errs.push(FieldError::new(
                    &[name],
                    "string_too_long",
                    format!("String should have at most {MAX_PROMPT_CHARS} characters"),
                    Value::String(s.clone()),
                ));
                None
            } else if required && s.trim().is_empty() {
                errs.push(FieldError::new(
                    &[name],
                    "value_error",
                    "Value error, prompt must not be empty",
                    Value::String(s.clone()),
                ));
                None
            } else {
                Some(s.clone())
            }
        }
        Some(v) => {
            errs.push(FieldError::new(
                &[name],
                "string_type",
                "Input should be a valid string",
                v.clone(),
            ));
            None
        }
    }
}

/// Integer as pydantic's lax mode reads it from JSON: an integer, or a float with no fractional part.
fn as_int(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    match v.as_f64() {
        Some(f) if v.is_f64() && f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    }
}

fn int_type_error(name: &str, v: &Value) -> FieldError {
    let (kind, msg) = if v.is_f64() {
        (
            "int_from_float",
            "Input should be a valid integer, got a number with a fractional part",
        )
    } else {
        ("int_type", "Input should be a valid integer")
    };
    FieldError::new(&[name], kind, msg, v.clone())
}

fn int_field(
    obj: &Map<String, Value>,
    name: &str,
    min: i64,
    max: i64,
    errs: &mut Vec<FieldError>,
) -> Option<i64> {
    let v = obj.get(name)?;
    match as_int(v) {
        Some(i) if i < min => {
            errs.push(FieldError::new(
                &[name],
                "greater_than_equal",
                format!("Input should be greater than or equal to {min}"),
                v.clone(),
            ));
            None
        }
        Some(i) if i > max => {
            errs.push(FieldError::new(
                &[name],
                "less_than_equal",
                format!("Input should be less than or equal to {max}"),
                v.clone(),
            ));
            None
        }
        Some(i) => Some(i),
        None => {
            errs.push(int_type_error(name, v));
            None
        }
    }
}

fn size_field(obj: &Map<String, Value>, errs: &mut Vec<FieldError>) -> Option<ImageSize> {
    let v = obj.get("image_size")?;
    match v {
        Value::String(name) => match SIZE_PRESETS.iter().find(|(p, _)| p == name) {
            Some((_, size)) => Some(*size),
            None => {
                let names = SIZE_PRESETS
                    .iter()
                    .map(|(p, _)| format!("'{p}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                errs.push(FieldError::new(
                    &["image_size"],
                    "enum",
                    format!("Input should be {names}"),
                    v.clone(),
                ));
                None
            }
        },
        Value::Object(o) => {
            let mut side = |name: &str| -> Option<u32> {
                let Some(s) = o.get(name) else {
                    errs.push(FieldError::new(
                        &["image_size", name],
                        "missing",
                        "Field required",
                        Value::Null,
                    ));
                    return None;
                };
                match as_int(s) {
                    Some(i) if i <= 0 => {
                        errs.push(FieldError::new(
                            &["image_size", name],
                            "greater_than",
                            "Input should be greater than 0",
                            s.clone(),
                        ));
                        None
                    }
                    Some(i) if i > i64::from(MAX_SIDE) => {
                        errs.push(FieldError::new(
                            &["image_size", name],
                            "less_than_equal",
                            format!("Input should be less than or equal to {MAX_SIDE}"),
                            s.clone(),
                        ));
                        None
                    }
                    Some(i) => Some(i as u32),
                    None => {
                        let mut e = int_type_error(name, s);
                        e.loc = vec!["body".into(), "image_size".into(), name.into()];
                        errs.push(e);
                        None
                    }
                }
            };
            let width = side("width");
            let height = side("height");
            Some(ImageSize {
                width: width?,
                height: height?,
            })
        }
        other => {
            errs.push(FieldError::new(
                &["image_size"],
                "union_type",
                "Input should be a size preset name or an object with width and height",
                other.clone(),
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(kind: EndpointKind, v: Value) -> JobInput {
        validate(kind, &v, || 7).expect("valid input")
    }

    fn fields(kind: EndpointKind, v: Value) -> Vec<String> {
        validate(kind, &v, || 7)
            .expect_err("invalid input")
            .0
            .iter()
            .map(FieldError::field)
            .collect()
    }

    #[test]
    fn request_ids_are_checked() {
        for good in [
            "a",
            "0f8c1e2a-3b4c-4d5e-8f90-123456789abc",
            "job_1.v2",
            &"x".repeat(128),
        ] {
            assert!(
                validate_request_id(good, &["body", "request_id"]).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "",
            "../../evil-x",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"x".repeat(129),
            &"x".repeat(300),
        ] {
            let err = validate_request_id(bad, &["body", "request_id"]).expect_err(bad);
            assert_eq!(err.0[0].field(), "request_id", "{bad}");
            assert!(err.0[0].input.as_str().expect("string").len() <= 3 * 129 + 3);
        }
    }

    #[test]
    fn a_huge_prompt_is_echoed_as_a_bounded_prefix() {
        let huge = "p".repeat(1_000_000);
        let err =
            validate(EndpointKind::Base, &json!({ "prompt": huge }), || 0).expect_err("too long");
        let body = err.to_body().to_string();
        assert!(body.len() < 2_000, "422 body is {} bytes", body.len());
        assert_eq!(err.0[0].field(), "prompt");
        let deep = json!({"a": [[[[[["x".repeat(10_000)]]]]]], "b": vec![1; 1000]});
        assert!(bounded_echo(&deep).to_string().len() < 2_000);
        assert_eq!(bounded_prefix("héllo", 2), "hé…");
        assert_eq!(bounded_prefix("hé", 2), "hé");
    }

    #[test]
    fn defaults_follow_the_kind() {
        let base = ok(EndpointKind::Base, json!({"prompt": "a cat", "extra": 1}));
        assert_eq!(base.num_inference_steps, 18);
        assert_eq!(
            base.image_size,
            ImageSize {
                width: 3840,
                height: 2160
            }
        );
        assert_eq!(base.seed, 7);
        assert_eq!(
            (base.num_images, base.output_format, base.guidance_scale),
            (1, OutputFormat::Jpeg, 5.0)
        );
        assert!(base.enable_safety_checker);
        assert_eq!(
            ok(EndpointKind::Sprint, json!({"prompt": "a cat"})).num_inference_steps,
            2
        );
    }

    #[test]
    fn presets_and_custom_sizes() {
        for (name, size) in SIZE_PRESETS {
            assert_eq!(
                ok(
                    EndpointKind::Base,
                    json!({"prompt": "x", "image_size": name})
                )
                .image_size,
                size
            );
        }
        let custom = ok(
            EndpointKind::Base,
            json!({"prompt": "x", "image_size": {"width": 300, "height": 200}}),
        );
        assert_eq!(
            custom.image_size,
            ImageSize {
                width: 300,
                height: 200
            }
        );
    }

    #[test]
    fn every_rule_names_its_field() {
        let k = EndpointKind::Base;
        assert_eq!(fields(k, json!({})), ["prompt"]);
        assert_eq!(fields(k, json!({"prompt": "   "})), ["prompt"]);
        assert_eq!(fields(k, json!({"prompt": 5})), ["prompt"]);
        assert_eq!(fields(k, json!({"prompt": "x".repeat(10_001)})), ["prompt"]);
        assert_eq!(
            fields(
                k,
                json!({"prompt": "x", "negative_prompt": "y".repeat(10_001)})
            ),
            ["negative_prompt"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "image_size": "huge"})),
            ["image_size"]
        );
        assert_eq!(
            fields(
                k,
                json!({"prompt": "x", "image_size": {"width": 0, "height": 5}})
            ),
            ["image_size.width"]
        );
        assert_eq!(
            fields(
                k,
                json!({"prompt": "x", "image_size": {"width": 5, "height": 14143}})
            ),
            ["image_size.height"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "image_size": {"width": 5}})),
            ["image_size.height"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "num_inference_steps": 0})),
            ["num_inference_steps"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "num_inference_steps": 51})),
            ["num_inference_steps"]
        );
        assert_eq!(
            fields(
                EndpointKind::Sprint,
                json!({"prompt": "x", "num_inference_steps": 21})
            ),
            ["num_inference_steps"]
        );
        assert_eq!(fields(k, json!({"prompt": "x", "seed": -1})), ["seed"]);
        assert_eq!(
            fields(k, json!({"prompt": "x", "seed": 9223372036854775808u64})),
            ["seed"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "guidance_scale": 20.5})),
            ["guidance_scale"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "enable_safety_checker": "yes"})),
            ["enable_safety_checker"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "num_images": 5})),
            ["num_images"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "num_images": 1.5})),
            ["num_images"]
        );
        assert_eq!(
            fields(k, json!({"prompt": "x", "output_format": "gif"})),
            ["output_format"]
        );
        assert_eq!(
            fields(k, json!({"num_images": 0})),
            ["prompt", "num_images"]
        );
        assert!(validate(k, &json!([1]), || 0).is_err());
    }

    #[test]
    fn given_seed_is_kept_and_null_draws_one() {
        assert_eq!(
            ok(EndpointKind::Base, json!({"prompt": "x", "seed": 42})).seed,
            42
        );
        assert_eq!(
            ok(EndpointKind::Base, json!({"prompt": "x", "seed": null})).seed,
            7
        );
    }

    #[test]
    fn billing_units() {
        assert_eq!(billable_units(1024, 1024, 1), 1);
        assert_eq!(billable_units(1025, 1024, 1), 2);
        assert_eq!(billable_units(3840, 2160, 1), 8); // 8 294 400 px / 1 048 576 = 7.91 -> 8
        assert_eq!(billable_units(1024, 1024, 4), 4);
        assert_eq!(billable_units(512, 512, 4), 4);
    }

    #[test]
    fn revalidation_accepts_its_own_output() {
        let input = ok(
            EndpointKind::Sprint,
            json!({"prompt": "x", "num_images": 3, "output_format": "png"}),
        );
        assert_eq!(revalidate(EndpointKind::Sprint, &input).unwrap(), input);
        let mut bad = input.clone();
        bad.num_inference_steps = 30;
        assert!(revalidate(EndpointKind::Sprint, &bad).is_err());
    }

    #[test]
    fn error_body_has_fastapi_shape() {
        let err = validate(
            EndpointKind::Base,
            &json!({"prompt": "x", "num_images": 9}),
            || 0,
        )
        .unwrap_err();
        let body = err.to_body();
        assert_eq!(body["detail"][0]["loc"], json!(["body", "num_images"]));
        assert_eq!(body["detail"][0]["type"], "less_than_equal");
        assert_eq!(body["detail"][0]["input"], 9);
    }
}
