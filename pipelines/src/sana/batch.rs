//! Cross-request batching of both pipelines (issue 14): compatible requests (same [`BatchKey`]: pipeline,
//! binned size, step count, CFG on/off) run as one batch, and each request's images are those of its solo
//! run. A solo run *is* a batch of one (`generate_with_noise` calls [`SanaPipeline::generate_batch_with_noise`]),
//! so both share every line of the sampling loop.
//!
//! Per request, exactly as solo: its own [`NoiseSource`] draws its initial latents (and Sprint's per-step
//! noise) in diffusers' order; its own sampler state; its own guidance scale (base: CFG over its own
//! `[negative × n; positive × n]` rows; Sprint: its own guidance embedding per row); its own decode, image
//! by image, resized to its own requested size. Shared: one text-encoder call for all prompts (and one for
//! all negative prompts; with batch invariance on it runs Gemma-2 prompt by prompt, see `text`), one
//! caption projection/K-V pass, and one transformer forward per step over the concatenated rows
//! `[request 0 rows; request 1 rows; …]`.
//!
//! Exactness: every operation of the transformer and text encoder is row-independent, so a request's
//! result could differ from its solo run only where a kernel's summation order depends on the batch size.
//! On the CPU (f32, gemm) none does: the tiny-checkpoint test `pipeline_e2e::batched_equals_solo_*` finds
//! batched runs bit-exact. On CUDA three did: the linear attention's chunking, cuBLASLt's algorithm choice by
//! row count, and cuBLAS's batched attention GEMMs in Gemma-2. With `ops::set_batch_invariant` on (the
//! default), each takes an order fixed by one batch row's shape, and the text encoder runs each prompt in a
//! call of its own (its trimmed prompts are too short for the pinned algorithms to be fast). Measured on an H100 at 1024²
//! (`bench/results/2026-12-07-h100-batch-invariant.md`): batched Sprint and base images bit-exact to
//! their solo runs in bursts of 2, 4 and 8. Off: 49.7 dB (Sprint) and 50.7 dB (base).
//!
//! Leaving a batch: an observer that returns an error (cancellation) takes only its request out before
//! the next step; its rows are dropped from the latents and the text context, and the others go on
//! with the same values. A request that cannot run (invalid, incompatible with the first valid
//! request's key, its noise source failed) fails alone; a failing forward fails the batch (`Err`).
//!
//! Answers: each request's outcome goes to the caller's `done` as soon as it is final ([`Outcomes`]):
//! a failed or cancelled request when it leaves, a completed one right after its own decode. The
//! decodes run request after request (see `DenoiserParts::decode_to_images`), so in a batch of k the
//! first answer comes k − 1 decodes before the last.

use candle_core::{DType, Tensor};

use super::{check_request, DenoiserParts, NoiseSource, PipelineCore, RunOptions};
use super::{SanaPipeline, SanaSprintPipeline};
use crate::scheduler::{self, FlowDpmSolver, ScmScheduler};
use crate::{BatchKey, GenerateRequest, PipelineError, PipelineKind, RequestOutcome, StepObserver};

/// One request of a batched run with its own noise source and observer.
pub struct BatchMember<'a> {
    pub request: &'a GenerateRequest,
    pub noise: &'a mut dyn NoiseSource,
    pub observer: &'a mut dyn StepObserver,
}

/// The [`BatchKey`] of `req` on a pipeline of `kind` with `parts`, or why it cannot run there.
pub(super) fn batch_key(
    parts: &DenoiserParts,
    kind: PipelineKind,
    req: &GenerateRequest,
    opts: RunOptions,
) -> Result<BatchKey, PipelineError> {
    check_request(req, kind)?;
    let (h, w) = parts.generation_size(req, opts)?;
    Ok(BatchKey {
        endpoint: kind,
        height: h as u32,
        width: w as u32,
        steps: req.num_inference_steps,
        cfg: kind == PipelineKind::Base && req.guidance_scale > 1.0,
    })
}

/// A request still in the run.
struct Live<S> {
    /// Index into the members (and the outcomes).
    idx: usize,
    /// Images of the request (`num_images`).
    n: usize,
    /// f32 latents `(n, C, h, w)`.
    latents: Tensor,
    sched: S,
    /// Sprint: the last x0 prediction.
    denoised: Option<Tensor>,
    /// Set when the request failed during a step (its noise source): it leaves at the next observation.
    left: Option<PipelineError>,
}

/// Hands each member's outcome to the caller's `done` exactly once, as soon as it is final.
struct Outcomes<'d> {
    done: &'d mut dyn FnMut(usize, RequestOutcome),
    given: Vec<bool>,
}

impl<'d> Outcomes<'d> {
    fn new(members: usize, done: &'d mut dyn FnMut(usize, RequestOutcome)) -> Self {
        Outcomes {
            done,
            given: vec![false; members],
        }
    }

    fn give(&mut self, idx: usize, outcome: RequestOutcome) {
        if !std::mem::replace(&mut self.given[idx], true) {
            (self.done)(idx, outcome);
        }
    }

    /// Ends a batch that ran to its end: a member no path answered (none should) still gets an answer.
    fn close(mut self) {
        for i in 0..self.given.len() {
            self.give(
                i,
                Err(PipelineError::InvalidRequest(
                    "request left no outcome".into(),
                )),
            );
        }
    }
}

/// Members that may run and the shared key (those that may not are answered already).
struct Admitted {
    /// `(member index, n)` of the admitted members, in member order.
    admitted: Vec<(usize, usize)>,
    key: Option<BatchKey>,
}

fn admit(
    parts: &DenoiserParts,
    kind: PipelineKind,
    members: &[BatchMember<'_>],
    outcomes: &mut Outcomes<'_>,
    opts: RunOptions,
) -> Admitted {
    let mut out = Admitted {
        admitted: Vec::new(),
        key: None,
    };
    for (i, m) in members.iter().enumerate() {
        match batch_key(parts, kind, m.request, opts) {
            Err(e) => outcomes.give(i, Err(e)),
            Ok(key) if out.key.is_some_and(|k| k != key) => outcomes.give(
                i,
                Err(PipelineError::InvalidRequest(format!(
                    "request {key:?} is not compatible with the batch {:?}",
                    out.key
                ))),
            ),
            Ok(key) => {
                out.key = Some(key);
                out.admitted.push((i, m.request.num_images as usize));
            }
        }
    }
    out
}

/// Every admitted prompt through the text encoder in one call, then each request's row repeated for its
/// `n` images (`encode_prompt` of a solo run); returned per live request, in order.
fn encode_per_request<S, T>(
    core: &PipelineCore<T>,
    live: &[Live<S>],
    members: &[BatchMember<'_>],
    negative: bool,
) -> Result<Vec<(Tensor, Tensor)>, PipelineError> {
    let prompts: Vec<String> = live
        .iter()
        .map(|l| {
            let r = members[l.idx].request;
            if negative {
                r.negative_prompt.clone()
            } else {
                r.prompt.clone()
            }
        })
        .collect();
    let (embeds, mask) = core.text.encode_prompts(&prompts, !negative)?;
    live.iter()
        .enumerate()
        .map(|(j, l)| {
            Ok((
                embeds.narrow(0, j, 1)?.repeat((l.n, 1, 1))?,
                mask.narrow(0, j, 1)?.repeat((l.n, 1))?,
            ))
        })
        .collect()
}

/// Calls each live request's observer after `step`; a request whose observer errs (or that failed
/// during the step) leaves with that error, and its `rows_per_image × n` rows leave the text context.
fn observe<S>(
    live: &mut Vec<Live<S>>,
    members: &mut [BatchMember<'_>],
    outcomes: &mut Outcomes<'_>,
    text: &mut crate::transformer::TextContext,
    rows_per_image: usize,
    (step, total): (u32, u32),
) -> Result<(), PipelineError> {
    let mut keep_rows = Vec::new();
    let mut kept = Vec::with_capacity(live.len());
    let mut offset = 0;
    for mut l in live.drain(..) {
        let rows = l.n * rows_per_image;
        let verdict = match l.left.take() {
            Some(e) => Err(e),
            None => members[l.idx].observer.on_step(step, total),
        };
        match verdict {
            Ok(()) => {
                keep_rows.extend(offset..offset + rows);
                kept.push(l);
            }
            Err(e) => outcomes.give(l.idx, Err(e)),
        }
        offset += rows;
    }
    *live = kept;
    if !live.is_empty() && keep_rows.len() < offset {
        *text = text.select_rows(&keep_rows)?;
    }
    Ok(())
}

/// Decodes the requests still live one after another, answering each as soon as its images exist.
fn finish<S>(
    parts: &DenoiserParts,
    live: Vec<(Live<S>, Tensor)>,
    members: &[BatchMember<'_>],
    mut outcomes: Outcomes<'_>,
    opts: RunOptions,
) {
    for (l, latents) in live {
        let images = parts.decode_to_images(&latents, members[l.idx].request, opts);
        outcomes.give(l.idx, images);
    }
    outcomes.close();
}

impl SanaPipeline {
    /// Runs `members` as one batch (CFG halves per request: rows `[neg_i × n_i; pos_i × n_i]` for each
    /// request `i` in turn, each guided with its own scale). See the module doc for the contract.
    pub fn generate_batch_with_noise(
        &mut self,
        members: &mut [BatchMember<'_>],
        opts: RunOptions,
        done: &mut dyn FnMut(usize, RequestOutcome),
    ) -> Result<(), PipelineError> {
        let core = &self.core;
        let parts = &core.parts;
        let mut outcomes = Outcomes::new(members.len(), done);
        let Admitted { admitted, key } =
            admit(parts, PipelineKind::Base, members, &mut outcomes, opts);
        let Some(key) = key else {
            finish::<()>(parts, Vec::new(), members, outcomes, opts);
            return Ok(());
        };
        let (h, w) = (key.height as usize, key.width as usize);
        let mut live = Vec::with_capacity(admitted.len());
        for (idx, n) in admitted {
            let sched = match FlowDpmSolver::new(&core.scheduler, key.steps as usize) {
                Ok(s) => s,
                Err(e) => {
                    outcomes.give(idx, Err(e));
                    continue;
                }
            };
            match members[idx]
                .noise
                .randn(&parts.latent_shape(n, h, w), &core.device)
            {
                Ok(latents) => live.push(Live {
                    idx,
                    n,
                    latents,
                    sched,
                    denoised: None,
                    left: None,
                }),
                Err(e) => outcomes.give(idx, Err(e)),
            }
        }
        if live.is_empty() {
            finish::<()>(parts, Vec::new(), members, outcomes, opts);
            return Ok(());
        }
        let pos = encode_per_request(core, &live, members, false)?;
        let mut rows = Vec::new();
        let mut masks = Vec::new();
        if key.cfg {
            let neg = encode_per_request(core, &live, members, true)?;
            for ((p, pm), (n, nm)) in pos.into_iter().zip(neg) {
                rows.extend([n, p]);
                masks.extend([nm, pm]);
            }
        } else {
            for (p, pm) in pos {
                rows.push(p);
                masks.push(pm);
            }
        }
        let transformer = &parts.transformer;
        let mut text =
            transformer.prepare_text(&Tensor::cat(&rows, 0)?, &Tensor::cat(&masks, 0)?)?;
        drop((rows, masks));
        let rows_per_image = if key.cfg { 2 } else { 1 };
        let timestep_scale = transformer.config().timestep_scale as f32;
        let timesteps = live[0].sched.timesteps().to_vec();
        let total = key.steps;
        for (i, t) in timesteps.iter().enumerate() {
            let x_in: Vec<&Tensor> = live
                .iter()
                .flat_map(|l| std::iter::repeat_n(&l.latents, rows_per_image))
                .collect();
            let x_in = Tensor::cat(&x_in, 0)?;
            // int64 timestep × timestep_scale → float32, one value for every row.
            let t = Tensor::new(&[*t as f32 * timestep_scale], &core.device)?;
            let out = transformer
                .forward(&x_in, &t, None, &text)?
                .to_dtype(DType::F32)?;
            let mut offset = 0;
            for l in live.iter_mut() {
                let chunk = out.narrow(0, offset, l.n * rows_per_image)?;
                offset += l.n * rows_per_image;
                let v = if key.cfg {
                    scheduler::classifier_free_guidance(
                        &chunk,
                        members[l.idx].request.guidance_scale,
                    )?
                } else {
                    chunk
                };
                l.latents = l.sched.step(&v, &l.latents)?;
            }
            let at = (i as u32 + 1, total);
            observe(
                &mut live,
                members,
                &mut outcomes,
                &mut text,
                rows_per_image,
                at,
            )?;
            if live.is_empty() {
                break;
            }
        }
        let live = live
            .into_iter()
            .map(|l| {
                let latents = l.latents.clone();
                (l, latents)
            })
            .collect();
        finish(parts, live, members, outcomes, opts);
        Ok(())
    }
}

impl SanaSprintPipeline {
    /// Runs `members` as one batch (per-row guidance embedding, per-request step noise). See the module
    /// doc for the contract.
    pub fn generate_batch_with_noise(
        &mut self,
        members: &mut [BatchMember<'_>],
        opts: RunOptions,
        done: &mut dyn FnMut(usize, RequestOutcome),
    ) -> Result<(), PipelineError> {
        let core = &self.core;
        let parts = &core.parts;
        let mut outcomes = Outcomes::new(members.len(), done);
        let Admitted { admitted, key } =
            admit(parts, PipelineKind::Sprint, members, &mut outcomes, opts);
        let Some(key) = key else {
            finish::<()>(parts, Vec::new(), members, outcomes, opts);
            return Ok(());
        };
        let (h, w) = (key.height as usize, key.width as usize);
        let mut live = Vec::with_capacity(admitted.len());
        for (idx, n) in admitted {
            let sched = match ScmScheduler::new(&core.scheduler, key.steps as usize) {
                Ok(s) => s,
                Err(e) => {
                    outcomes.give(idx, Err(e));
                    continue;
                }
            };
            let sigma_data = sched.sigma_data();
            let drawn = members[idx]
                .noise
                .randn(&parts.latent_shape(n, h, w), &core.device)
                .and_then(|z| Ok(z.affine(f64::from(sigma_data), 0.0)?));
            match drawn {
                Ok(latents) => live.push(Live {
                    idx,
                    n,
                    latents,
                    sched,
                    denoised: None,
                    left: None,
                }),
                Err(e) => outcomes.give(idx, Err(e)),
            }
        }
        if live.is_empty() {
            finish::<()>(parts, Vec::new(), members, outcomes, opts);
            return Ok(());
        }
        let (rows, masks): (Vec<Tensor>, Vec<Tensor>) =
            encode_per_request(core, &live, members, false)?
                .into_iter()
                .unzip();
        let transformer = &parts.transformer;
        let mut text =
            transformer.prepare_text(&Tensor::cat(&rows, 0)?, &Tensor::cat(&masks, 0)?)?;
        drop((rows, masks));
        let cfg = transformer.config();
        let guidance_of = |req: &GenerateRequest| {
            super::sprint_guidance(
                req.guidance_scale,
                cfg.guidance_embeds_scale,
                transformer.dtype(),
            )
        };
        let total = key.steps;
        for i in 0..total {
            // Every request has the same schedule (same step count), so the same scalars.
            let inp = live[0].sched.step_input();
            let x_ins = live
                .iter()
                .map(|l| l.sched.model_input(&l.latents, l.sched.step_input()))
                .collect::<Result<Vec<_>, _>>()?;
            let guidance: Vec<f32> = live
                .iter()
                .flat_map(|l| std::iter::repeat_n(guidance_of(members[l.idx].request), l.n))
                .collect();
            let rows = guidance.len();
            let guidance = Tensor::from_vec(guidance, rows, &core.device)?;
            let tau = Tensor::new(&[inp.scm_timestep], &core.device)?;
            let v = transformer.forward(&Tensor::cat(&x_ins, 0)?, &tau, Some(&guidance), &text)?;
            let mut offset = 0;
            for (l, x_in) in live.iter_mut().zip(&x_ins) {
                let inp = l.sched.step_input();
                let f = l
                    .sched
                    .trigflow_output(x_in, &v.narrow(0, offset, l.n)?, inp)?;
                offset += l.n;
                let shape = l.latents.dims().to_vec();
                match members[l.idx].noise.randn(&shape, &core.device) {
                    Ok(z) => {
                        let (prev, x0) = l.sched.step(&f, &l.latents, &z)?;
                        l.latents = prev;
                        l.denoised = Some(x0);
                    }
                    Err(e) => l.left = Some(e),
                }
            }
            observe(
                &mut live,
                members,
                &mut outcomes,
                &mut text,
                1,
                (i + 1, total),
            )?;
            if live.is_empty() {
                break;
            }
        }
        let mut finished = Vec::with_capacity(live.len());
        for l in live {
            let sigma_data = l.sched.sigma_data();
            let Some(x0) = l.denoised.as_ref() else {
                outcomes.give(
                    l.idx,
                    Err(PipelineError::InvalidRequest("no denoising steps".into())),
                );
                continue;
            };
            // latents = denoised / sigma_data
            let latents = x0.broadcast_div(&Tensor::new(sigma_data, x0.device())?)?;
            finished.push((l, latents));
        }
        finish(parts, finished, members, outcomes, opts);
        Ok(())
    }
}
