//! Model-file resolution: a diffusers-layout checkpoint on local disk or on the Hugging Face Hub.
//!
//! A [`ModelSource`] names either a local directory in the diffusers `save_pretrained` layout
//! (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) or a Hub
//! repo id with an optional pinned revision. [`ModelRepo::component`] resolves one component folder (or
//! the repo root, for the single-model safety-checker repos) to local paths: its `config.json` and its
//! safetensors — a single file, shards listed by `*.safetensors.index.json`, or the `bf16` variant
//! (`diffusion_pytorch_model.bf16.safetensors`) when asked. Hub downloads go through `hf-hub` 0.4's tokio
//! API and honour `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` (cache only) like
//! `huggingface_hub`. Every missing file is reported by its repo-relative name.
//!
//! [`var_builder`] memory-maps the safetensors; tensors stored in another dtype (the fp32 shards of the
//! Sana repos) are cast on load to the requested one (round-to-nearest-even, as torch's `.to(bf16)`).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

use super::PipelineError;

/// Where a pipeline's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSource {
    /// A Hugging Face repo id (`Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers`) or a local directory.
    pub id: String,
    /// Hub revision (branch, tag or commit); `None` means `main`. Ignored for local directories.
    pub revision: Option<String>,
}

impl ModelSource {
    pub fn new(id: impl Into<String>) -> Self {
        ModelSource {
            id: id.into(),
            revision: None,
        }
    }
}

/// Which safetensors of a component to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightVariant {
    /// The default files (`diffusion_pytorch_model.safetensors`, sharded or not; `model.safetensors` for
    /// transformers components).
    #[default]
    Default,
    /// The `bf16` variant files (`diffusion_pytorch_model.bf16.safetensors`, …).
    Bf16,
}

/// One resolved component: its local folder, config file and weight files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentFiles {
    /// Local folder holding the component's files (`<snapshot>/transformer`, or the root).
    pub dir: PathBuf,
    /// `config.json` of the component.
    pub config: PathBuf,
    /// Safetensors files, in shard order.
    pub weights: Vec<PathBuf>,
}

enum Backend {
    Local(PathBuf),
    Hub(Box<HubRepo>),
}

struct HubRepo {
    runtime: tokio::runtime::Runtime,
    /// `None` when offline (`HF_HUB_OFFLINE=1`): files come from the cache only.
    api: Option<hf_hub::api::tokio::ApiRepo>,
    cache: hf_hub::CacheRepo,
    /// Repo file list from the Hub API, fetched once.
    siblings: Option<HashSet<String>>,
}

/// An opened model repository (local or Hub).
pub struct ModelRepo {
    source: ModelSource,
    backend: Backend,
}

fn load_err(msg: impl Into<String>) -> PipelineError {
    PipelineError::Load(msg.into())
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

impl ModelRepo {
    /// Opens `source`: an existing directory is used as is; anything else is a Hub repo id.
    pub fn open(source: &ModelSource) -> Result<Self, PipelineError> {
        let path = Path::new(&source.id);
        if path.is_dir() {
            return Ok(ModelRepo {
                source: source.clone(),
                backend: Backend::Local(path.to_path_buf()),
            });
        }
        let looks_like_path = source.id.starts_with('/')
            || source.id.starts_with('.')
            || source.id.split('/').count() > 2;
        if looks_like_path {
            return Err(load_err(format!(
                "model directory {} does not exist",
                source.id
            )));
        }
        let repo = match &source.revision {
            Some(rev) => {
                hf_hub::Repo::with_revision(source.id.clone(), hf_hub::RepoType::Model, rev.clone())
            }
            None => hf_hub::Repo::model(source.id.clone()),
        };
        let cache = hf_hub::Cache::from_env();
        let offline = env_flag("HF_HUB_OFFLINE");
        let api = if offline {
            None
        } else {
            let token = std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
                .or_else(|| cache.token());
            let api = hf_hub::api::tokio::ApiBuilder::from_env()
                .with_token(token)
                .with_progress(false)
                .build()
                .map_err(|e| load_err(format!("hub client for {}: {e}", source.id)))?;
            Some(api.repo(repo.clone()))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| load_err(format!("download runtime: {e}")))?;
        let hub = HubRepo {
            runtime,
            api,
            cache: cache.repo(repo),
            siblings: None,
        };
        Ok(ModelRepo {
            source: source.clone(),
            backend: Backend::Hub(Box::new(hub)),
        })
    }

    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// Whether the repo has the file `rel` (repo-relative, `/`-separated).
    pub fn has_file(&mut self, rel: &str) -> Result<bool, PipelineError> {
        match &mut self.backend {
            Backend::Local(root) => Ok(root.join(rel).is_file()),
            Backend::Hub(hub) => hub.has_file(rel, &self.source.id),
        }
    }

    /// Local path of the file `rel`, downloading it if needed.
    pub fn file(&mut self, rel: &str) -> Result<PathBuf, PipelineError> {
        match &mut self.backend {
            Backend::Local(root) => {
                let p = root.join(rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(load_err(format!(
                        "missing file {rel} in model directory {}",
                        root.display()
                    )))
                }
            }
            Backend::Hub(hub) => hub.file(rel, &self.source),
        }
    }

    /// Resolves the component folder `component` (`""` for the repo root) to its config and weights.
    /// Diffusers (`diffusion_pytorch_model*`) and transformers (`model*`) file names are both accepted.
    pub fn component(
        &mut self,
        component: &str,
        variant: WeightVariant,
    ) -> Result<ComponentFiles, PipelineError> {
        let (prefix, config, dir) = self.component_config(component)?;
        let mut tried = Vec::new();
        if let Some(weights) = self.weights(&prefix, variant, &mut tried)? {
            return Ok(ComponentFiles {
                dir,
                config,
                weights,
            });
        }
        Err(load_err(format!(
            "no safetensors weights in {}: looked for {}",
            self.source.id,
            tried.join(", ")
        )))
    }

    /// [`Self::component`] for weights that will be used in `dtype`: the `bf16` variant when `dtype` is
    /// bf16 and the component has one (no fp32→bf16 cast on load, half the bytes read), else the default
    /// files (cast on load by [`var_builder`]).
    pub fn component_for(
        &mut self,
        component: &str,
        dtype: DType,
    ) -> Result<ComponentFiles, PipelineError> {
        if dtype == DType::BF16 {
            let (prefix, config, dir) = self.component_config(component)?;
            if let Some(weights) = self.weights(&prefix, WeightVariant::Bf16, &mut Vec::new())? {
                return Ok(ComponentFiles {
                    dir,
                    config,
                    weights,
                });
            }
        }
        self.component(component, WeightVariant::Default)
    }

    /// The component's repo-relative prefix (`"vae/"`, or `""` for the root), config path and local folder.
    fn component_config(
        &mut self,
        component: &str,
    ) -> Result<(String, PathBuf, PathBuf), PipelineError> {
        let prefix = if component.is_empty() {
            String::new()
        } else {
            format!("{}/", component.trim_end_matches('/'))
        };
        let config = self.file(&format!("{prefix}config.json"))?;
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((prefix, config, dir))
    }

    /// The weight files of `variant` under `prefix`, or `None` when there are none (names looked for are
    /// appended to `tried`).
    fn weights(
        &mut self,
        prefix: &str,
        variant: WeightVariant,
        tried: &mut Vec<String>,
    ) -> Result<Option<Vec<PathBuf>>, PipelineError> {
        let suffix = match variant {
            WeightVariant::Default => "",
            WeightVariant::Bf16 => ".bf16",
        };
        for stem in ["diffusion_pytorch_model", "model"] {
            let single = format!("{prefix}{stem}{suffix}.safetensors");
            // diffusers names sharded variant indexes `<stem>.safetensors.index.<variant>.json`.
            let index = match variant {
                WeightVariant::Default => format!("{prefix}{stem}.safetensors.index.json"),
                WeightVariant::Bf16 => format!("{prefix}{stem}.safetensors.index.bf16.json"),
            };
            if self.has_file(&single)? {
                return Ok(Some(vec![self.file(&single)?]));
            }
            if self.has_file(&index)? {
                let index_path = self.file(&index)?;
                let shards = shard_names(&index_path)?;
                let mut weights = Vec::with_capacity(shards.len());
                for shard in shards {
                    weights.push(self.file(&format!("{prefix}{shard}"))?);
                }
                return Ok(Some(weights));
            }
            tried.push(single);
            tried.push(index);
        }
        Ok(None)
    }
}

impl HubRepo {
    fn block<T>(&self, fut: impl std::future::Future<Output = T> + Send) -> T
    where
        T: Send,
    {
        // A dedicated thread keeps this usable from inside an async context (block_on would panic there).
        std::thread::scope(|s| {
            s.spawn(|| self.runtime.block_on(fut))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn has_file(&mut self, rel: &str, id: &str) -> Result<bool, PipelineError> {
        let Some(api) = &self.api else {
            return Ok(self.cache.get(rel).is_some());
        };
        if self.siblings.is_none() {
            let info = self
                .block(api.info())
                .map_err(|e| load_err(format!("listing files of {id} on the Hub: {e}")))?;
            self.siblings = Some(info.siblings.into_iter().map(|s| s.rfilename).collect());
        }
        Ok(self.siblings.as_ref().is_some_and(|s| s.contains(rel)))
    }

    fn file(&mut self, rel: &str, source: &ModelSource) -> Result<PathBuf, PipelineError> {
        if let Some(p) = self.cache.get(rel) {
            return Ok(p);
        }
        let rev = source.revision.as_deref().unwrap_or("main");
        let Some(api) = &self.api else {
            return Err(load_err(format!(
                "missing file {rel} of {}@{rev}: not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                source.id
            )));
        };
        self.block(api.get(rel))
            .map_err(|e| load_err(format!("downloading {rel} of {}@{rev}: {e}", source.id)))
    }
}

/// Shard file names of a `*.safetensors.index.json`, in sorted order (as `weight_map` values).
fn shard_names(index: &Path) -> Result<Vec<String>, PipelineError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let parsed: Index = read_json(index)?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(load_err(format!("{} lists no shards", index.display())));
    }
    Ok(shards.into_iter().collect())
}

/// Memory-maps `files` into one [`VarBuilder`]; tensors are cast to `dtype` on load.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, PipelineError> {
    if files.is_empty() {
        return Err(load_err("no weight files to load"));
    }
    for f in files {
        if !f.is_file() {
            return Err(load_err(format!("missing weight file {}", f.display())));
        }
    }
    // SAFETY: the files are checkpoint files that nothing in this process writes; the mmap is read-only.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|e| load_err(format!("opening safetensors {}: {e}", display_list(files))))
}

fn display_list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads `<dir>/config.json` into `T`.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T, PipelineError> {
    read_json(&dir.join("config.json"))
}

/// Reads and parses one JSON file, naming it in errors. Python's `json.dumps` writes the non-standard
/// literals `NaN`, `Infinity` and `-Infinity` (e.g. `"lambda_min_clipped": -Infinity` in diffusers
/// scheduler configs); they are read as `null`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PipelineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| load_err(format!("reading {}: {e}", path.display())))?;
    serde_json::from_str(&python_json_literals_to_null(&text))
        .map_err(|e| load_err(format!("parsing {}: {e}", path.display())))
}

/// Replaces `NaN`, `Infinity`, `-Infinity` outside string literals with `null`.
fn python_json_literals_to_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(lit) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|l| rest.starts_with(l))
        {
            out.push_str("null");
            rest = &rest[lit.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::collections::HashMap;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!("fleet-loader-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).expect("temp dir is writable");
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/sana")
    }

    #[derive(serde::Deserialize)]
    struct Cfg {
        hidden: usize,
    }

    /// Writes a two-shard fp32 checkpoint plus index into `dir/transformer`.
    fn write_sharded(dir: &Path) -> (Tensor, Tensor) {
        let comp = dir.join("transformer");
        std::fs::create_dir_all(&comp).unwrap();
        std::fs::write(comp.join("config.json"), r#"{"hidden": 3}"#).unwrap();
        let a = Tensor::new(
            &[[1.0f32, 1.0 + 1.0 / 256.0 + 1.0 / 512.0, -3.3]],
            &Device::Cpu,
        )
        .unwrap();
        let b = Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap();
        let s1 = "diffusion_pytorch_model-00001-of-00002.safetensors";
        let s2 = "diffusion_pytorch_model-00002-of-00002.safetensors";
        candle_core::safetensors::save(
            &HashMap::from([("a.weight".to_string(), a.clone())]),
            comp.join(s1),
        )
        .unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("b.bias".to_string(), b.clone())]),
            comp.join(s2),
        )
        .unwrap();
        let index = serde_json::json!({"metadata": {"total_size": 20}, "weight_map": {"a.weight": s1, "b.bias": s2}});
        std::fs::write(
            comp.join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        (a, b)
    }

    #[test]
    fn sharded_checkpoint_resolves_and_casts_to_bf16() {
        let tmp = TempDir::new();
        let (a, b) = write_sharded(&tmp.0);
        let mut repo = ModelRepo::open(&ModelSource::new(tmp.0.to_string_lossy())).unwrap();
        let files = repo
            .component("transformer", WeightVariant::Default)
            .unwrap();
        assert_eq!(files.weights.len(), 2);
        assert!(files.weights[0].ends_with("diffusion_pytorch_model-00001-of-00002.safetensors"));
        let cfg: Cfg = read_config(&files.dir).unwrap();
        assert_eq!(cfg.hidden, 3);
        let vb = var_builder(&files.weights, DType::BF16, &Device::Cpu).unwrap();
        let got_a = vb.get((1, 3), "a.weight").unwrap();
        assert_eq!(got_a.dtype(), DType::BF16);
        // Exact: the cast is round-to-nearest-even, same as half::bf16::from_f32 (torch's .to(bf16)).
        let want: Vec<f32> = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = want
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        let got: Vec<f32> = got_a
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, want);
        assert_eq!(
            got[1],
            1.0 + 1.0 / 128.0,
            "tie 1+1/256+1/512 rounds up to the next bf16"
        );
        let got_b = vb
            .get(2, "b.bias")
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want_b: Vec<f32> = b
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_f32())
            .collect();
        assert_eq!(got_b, want_b);
        // A misnamed weight fails with its name.
        let err = vb.get(2, "c.bias").unwrap_err().to_string();
        assert!(err.contains("c.bias"), "{err}");
    }

    #[test]
    fn python_json_literals_read_as_null() {
        let t = r#"{"a": -Infinity, "b": "NaN -Infinity \" Infinity", "c": [NaN, Infinity, 1.5]}"#;
        let v: serde_json::Value = serde_json::from_str(&python_json_literals_to_null(t)).unwrap();
        assert!(v["a"].is_null());
        assert_eq!(v["b"], "NaN -Infinity \" Infinity");
        assert_eq!(v["c"], serde_json::json!([null, null, 1.5]));
    }

    #[test]
    fn bf16_variant_is_preferred_when_asked() {
        let tmp = TempDir::new();
        write_sharded(&tmp.0);
        let comp = tmp.0.join("transformer");
        let t = Tensor::new(&[2.0f32], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let variant = comp.join("diffusion_pytorch_model.bf16.safetensors");
        candle_core::safetensors::save(&HashMap::from([("x".to_string(), t)]), &variant).unwrap();
        let mut repo = ModelRepo::open(&ModelSource::new(tmp.0.to_string_lossy())).unwrap();
        assert_eq!(
            repo.component("transformer", WeightVariant::Bf16)
                .unwrap()
                .weights,
            vec![variant.clone()]
        );
        assert_eq!(
            repo.component("transformer", WeightVariant::Default)
                .unwrap()
                .weights
                .len(),
            2
        );
        // Loading in bf16 takes the variant; in f32 the default shards; a component without the
        // variant falls back to its default files.
        assert_eq!(
            repo.component_for("transformer", DType::BF16)
                .unwrap()
                .weights,
            vec![variant.clone()]
        );
        assert_eq!(
            repo.component_for("transformer", DType::F32)
                .unwrap()
                .weights
                .len(),
            2
        );
        std::fs::remove_file(&variant).unwrap();
        assert_eq!(
            repo.component_for("transformer", DType::BF16)
                .unwrap()
                .weights
                .len(),
            2
        );
    }

    #[test]
    fn missing_files_are_named() {
        let tmp = TempDir::new();
        write_sharded(&tmp.0);
        std::fs::remove_file(
            tmp.0
                .join("transformer/diffusion_pytorch_model-00002-of-00002.safetensors"),
        )
        .unwrap();
        let mut repo = ModelRepo::open(&ModelSource::new(tmp.0.to_string_lossy())).unwrap();
        let err = repo
            .component("transformer", WeightVariant::Default)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transformer/diffusion_pytorch_model-00002-of-00002.safetensors"),
            "{err}"
        );
        let err = repo
            .component("vae", WeightVariant::Default)
            .unwrap_err()
            .to_string();
        assert!(err.contains("vae/config.json"), "{err}");
        let err = repo
            .component("transformer", WeightVariant::Bf16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("diffusion_pytorch_model.bf16.safetensors"),
            "{err}"
        );
        let err = ModelRepo::open(&ModelSource::new("/nonexistent/fleet/model"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/fleet/model"), "{err}");
    }

    #[test]
    fn offline_hub_repo_without_cache_names_the_file() {
        // Point HF_HOME at an empty dir via the cache API directly (no env mutation in parallel tests).
        let tmp = TempDir::new();
        let repo = hf_hub::Repo::model("nobody/nothing".to_string());
        let mut hub = HubRepo {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            api: None,
            cache: hf_hub::Cache::new(tmp.0.clone()).repo(repo),
            siblings: None,
        };
        assert!(!hub
            .has_file("transformer/config.json", "nobody/nothing")
            .unwrap());
        let err = hub
            .file(
                "transformer/config.json",
                &ModelSource::new("nobody/nothing"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transformer/config.json") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
    }

    #[test]
    fn tiny_fixture_components_resolve() {
        let root = fixture_root();
        let mut repo = ModelRepo::open(&ModelSource::new(root.to_string_lossy())).unwrap();
        for comp in ["transformer", "vae", "text_encoder"] {
            let files = repo.component(comp, WeightVariant::Default).unwrap();
            assert!(!files.weights.is_empty(), "{comp}");
            var_builder(&files.weights, DType::F32, &Device::Cpu).unwrap();
        }
        assert!(repo.file("scheduler/scheduler_config.json").is_ok());
        assert!(repo.file("tokenizer/tokenizer.json").is_ok());
    }
}
